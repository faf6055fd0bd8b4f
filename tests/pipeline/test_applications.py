"""img2img, inpaint, denoise, anomaly, upscale: types and sizes on a tiny random model, and behaviour on a model
that knows its data (tests/wiener.py: the exact denoiser of smooth random fields)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.pipeline.applications import estimate_noise
from ldm.pipeline.images import to_tensor
from tiny_models import save_tiny_pipeline
from wiener import SIZE, knowing_pipeline, smooth_fields

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a turtle playing basketball"
FAST = dict(steps=4, progress=False)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request, sd1_folder, tmp_path_factory):
    """The applications on SD 1.x and on SDXL (two text encoders, micro-conditioning): the same behaviour."""
    if request.param == "sdxl":
        from tiny_sdxl import save_tiny_sdxl

        return Pipeline.from_pretrained(save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "base", seed=2))
    return Pipeline.from_pretrained(sd1_folder)


def photo(size=(32, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------- types, sizes, round trips (random model)
def test_img2img_types_sizes_and_seeds(pipe):
    images = pipe.img2img(PROMPT, photo(), strength=0.5, seed=3, num_images_per_prompt=2, **FAST)
    assert len(images) == 2 and all(im.size == (32, 24) for im in images)
    assert images[1].info["ldm"] and '"strength": 0.5' in images[1].info["ldm"]
    alone = pipe.img2img(PROMPT, photo(), strength=0.5, seed=4, **FAST)[0]
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))
    resized = pipe.img2img(PROMPT, photo((30, 20)), height=16, width=24, strength=0.3, output_type="np", **FAST)
    assert resized.shape == (1, 16, 24, 3)


def test_img2img_strength_zero_is_the_vae_round_trip(pipe):
    source = photo()
    z0 = pipe.encode_images(to_tensor(source))
    latents = pipe.img2img(PROMPT, source, strength=0.0, output_type="latent", **FAST)
    torch.testing.assert_close(latents, z0, rtol=0, atol=0)
    pixels = pipe.img2img(PROMPT, source, strength=0.0, output_type="np", **FAST)
    np.testing.assert_array_equal(pixels, (pipe.decode_latents(z0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    moved = pipe.img2img(PROMPT, source, strength=0.5, output_type="latent", **FAST)
    assert (moved - z0).abs().max() > 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=1.5), r"strength must be in \[0, 1\]"),
    (dict(strength="lots"), "strength must be a number"),
    (dict(image="no/such.png"), "image 'no/such.png' does not exist"),
    (dict(image=photo((30, 24))), "the image is 30x24; both sides must be multiples of 8"),
    (dict(prompt=[]), "empty list"),
    (dict(sampler="nope"), "unknown sampler"),
])
def test_img2img_bad_input_fails_before_the_models_run(pipe, monkeypatch, kwargs, match):
    def forbidden(*a, **k):
        raise AssertionError("a model ran before the input was checked")

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        monkeypatch.setattr(module, "forward", forbidden)
    monkeypatch.setattr(pipe.vae, "encode", forbidden)
    args = {"prompt": PROMPT, "image": photo(), **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.img2img(args.pop("prompt"), args.pop("image"), **args, **FAST)


def test_not_an_image_file(pipe, tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ValueError, match="notes.png' is not a readable image"):
        pipe.img2img(PROMPT, tmp_path / "notes.png", **FAST)


def square_mask(size=(32, 24)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (16, 8, 32, 24))  # repaint the lower right quarter
    return mask


def test_inpainting_keeps_the_unmasked_region(pipe):
    source, mask = photo(), square_mask()
    keep = np.asarray(mask) == 0
    z0 = pipe.encode_images(to_tensor(source))
    latents = pipe.inpaint(PROMPT, source, mask, seed=1, output_type="latent", **FAST)
    latent_keep = torch.from_numpy(keep[::2, ::2].copy())  # the tiny VAE downsamples by 2
    assert torch.equal(latents[..., latent_keep], z0[..., latent_keep])  # exactly the original latents
    assert (latents[..., ~latent_keep] - z0[..., ~latent_keep]).abs().mean() > 0.1  # the masked part is new
    result = np.asarray(pipe.inpaint(PROMPT, source, mask, seed=1, **FAST)[0])
    assert np.array_equal(result[keep], np.asarray(source)[keep])  # pixels pasted back outside the mask
    assert np.abs(result[~keep].astype(int) - np.asarray(source)[~keep]).mean() > 10
    with pytest.raises(ValueError, match="mask is 16x24 but the image is 32x24"):
        pipe.inpaint(PROMPT, source, Image.new("L", (16, 24)), **FAST)


def test_inpainting_unet_with_nine_channels(tmp_path):
    inpainter = Pipeline.from_pretrained(save_tiny_pipeline(tmp_path / "inpaint", "sd1", inpaint=True))
    assert inpainter.is_inpainting_model
    images = inpainter.inpaint(PROMPT, photo(), square_mask(), seed=0, num_images_per_prompt=2, **FAST)
    assert [im.size for im in images] == [(32, 24)] * 2
    keep = np.asarray(square_mask()) == 0
    assert np.array_equal(np.asarray(images[0])[keep], np.asarray(photo())[keep])
    raw = inpainter.inpaint(PROMPT, photo(), square_mask(), seed=0, paste_back=False, output_type="np", **FAST)
    other = inpainter.inpaint(PROMPT, photo(seed=1), square_mask(), seed=0, paste_back=False, output_type="np",
                              **FAST)
    assert np.abs(raw - other).max() > 1e-3  # the U-Net does see the masked image through its extra channels
    assert inpainter(PROMPT, height=16, width=16, **FAST)[0].size == (16, 16)  # text-to-image works too


def test_upscale_doubles_the_size(pipe):
    for mode in ("pixel", "latent"):
        out = pipe.upscale(photo((16, 16)), 2, PROMPT, strength=0.4, mode=mode, seed=0, **FAST)
        assert out[0].size == (32, 32), mode
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        pipe.upscale(photo(), 0.5)
    with pytest.raises(ValueError, match="mode must be 'pixel' or 'latent'"):
        pipe.upscale(photo(), 2, mode="bicubic")


def test_noise_level_estimate():
    smooth = np.linspace(0, 1, 64)[None, :, None] * np.ones((64, 64, 3))
    rng = np.random.default_rng(0)
    for sigma in (0.02, 0.1):
        noisy = np.clip(smooth * 0.6 + 0.2 + rng.normal(0, sigma, smooth.shape), 0, 1)
        pixels = torch.from_numpy(noisy * 2 - 1).permute(2, 0, 1)[None].float()
        assert abs(estimate_noise(pixels) - sigma) < 0.15 * sigma


# ---------------------------------------------------------------------- a model that knows its data
@pytest.fixture(scope="module")
def knowing():
    return knowing_pipeline()


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def test_anomaly_map_lights_up_a_foreign_patch(knowing):
    clean = smooth_fields(1, seed=99)[0]
    patched = clean.clone()
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 1.6 - 0.8
    patched[:, 8:16, 16:24] = checker  # a checkerboard pasted in: nothing like the smooth data
    inside = np.zeros((SIZE, SIZE), bool)
    inside[8:16, 16:24] = True
    score_clean, map_clean = knowing.anomaly(to_pil(clean), strength=0.3, steps=10)
    score, error = knowing.anomaly(to_pil(patched), strength=0.3, steps=10)
    assert error.shape == (SIZE, SIZE) and error.dtype == np.float32
    assert error[inside].mean() > 5 * error[~inside].mean(), (error[inside].mean(), error[~inside].mean())
    assert error[inside].mean() > 4 * map_clean[inside].mean()  # the same place in the clean image is quiet
    assert score > 4 * score_clean, (score, score_clean)


def test_denoise_brings_a_noisy_image_back(knowing):
    clean = smooth_fields(1, seed=7)[0]
    sigma_px = 0.1  # in [0, 1] units: 0.2 in the model's [-1, 1] units
    noisy = clean + 2 * sigma_px * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    pixels = to_tensor(to_pil(noisy))
    assert abs(knowing.latent_sigma(pixels, knowing.encode_images(pixels), sigma_px) - 2 * sigma_px) < 0.02
    reference = (clean.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) / 2
    err_before = np.abs(np.asarray(to_pil(noisy)) / 255.0 - reference).mean()
    for level in (sigma_px, None):  # given, and estimated from the image
        after = knowing.denoise(to_pil(noisy), noise_level=level, steps=20, seed=0, output_type="np",
                                progress=False)[0]
        assert after.shape == (SIZE, SIZE, 3)
        err_after = np.abs(after - reference).mean()
        assert err_after < 0.35 * err_before, (level, err_before, err_after)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 1\]"):
        knowing.denoise(to_pil(noisy), noise_level=3.0)
