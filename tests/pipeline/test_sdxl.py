"""SDXL on tiny random weights: ldm draws what diffusers' StableDiffusionXLPipeline draws from the same folder,
and the refiner's conditions (bigG only, aesthetic score) are diffusers' own."""

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.pipeline.conditioning import SizeConditioning
from tiny_sdxl import save_tiny_sdxl

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a turtle playing basketball", "a red apple"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "base", seed=3)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "refiner", refiner=True, seed=5)


def diffusers_pipe(folder, cls_name="StableDiffusionXLPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", [None, ["blurry", ""]], ids=["zeros-for-no-negative", "negative-given"])
def test_images_match_diffusers(base, negative):
    latents = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    expected = diffusers_pipe(base)(PROMPTS, negative_prompt=negative, num_inference_steps=8, guidance_scale=5.0,
                                    latents=latents, height=24, width=32, output_type="np").images
    ours = Pipeline.from_pretrained(base)(PROMPTS, negative_prompt=negative, steps=8, guidance=5.0, sampler="ddim",
                                          latents=latents, height=24, width=32, output_type="np", progress=False)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(expected[0] - expected[1]).max() > 0.05   # not trivially alike


def test_micro_conditioning_changes_the_image_as_in_diffusers(base):
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    size = dict(original_size=(512, 256), crops_coords_top_left=(8, 16), target_size=(24, 32))
    expected = diffusers_pipe(base)(PROMPTS[0], num_inference_steps=6, guidance_scale=5.0, latents=latents,
                                    height=24, width=32, output_type="np", **size).images
    pipe = Pipeline.from_pretrained(base)
    ours = pipe(PROMPTS[0], steps=6, guidance=5.0, sampler="ddim", latents=latents, height=24, width=32,
                output_type="np", progress=False, sizes=SizeConditioning(**size))
    plain = pipe(PROMPTS[0], steps=6, guidance=5.0, sampler="ddim", latents=latents, height=24, width=32,
                 output_type="np", progress=False)
    assert np.abs(ours - expected).max() <= 2 / 255 and np.abs(ours - plain).max() > 1e-3


def test_sdxl_defaults_and_text_encoders_match(base):
    pipe = Pipeline.from_pretrained(base)
    theirs = diffusers_pipe(base)
    assert pipe.defaults["guidance"] == 5.0 and pipe.components.info.family == "sdxl"
    assert pipe.request("x", seed=0).height == 16     # the U-Net's sample size × the VAE's downscale
    cond = pipe.text_conditions(PROMPTS)
    context, _, pooled, _ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["context"], context, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-4, atol=1e-5)
    for clip_skip in (2,):   # ours = diffusers' + 1
        context, *_ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clip_skip=clip_skip - 1)
        torch.testing.assert_close(pipe.text_conditions(PROMPTS, clip_skip)["context"], context, rtol=1e-4,
                                   atol=1e-5)


def test_refiner_conditions_match_diffusers(refiner):
    pipe = Pipeline.from_pretrained(refiner)
    theirs = diffusers_pipe(refiner, "StableDiffusionXLImg2ImgPipeline")
    assert pipe.components.info.family == "sdxl_refiner" and pipe.text_encoder_2 is None
    cond = pipe.text_conditions(PROMPTS)
    context, negative, pooled, negative_pooled = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["context"], context, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pipe.text_conditions(["", ""])["context"], negative, rtol=1e-4, atol=1e-5)
    ids, negative_ids = theirs._get_add_time_ids((24, 32), (0, 0), (24, 32), 6.0, 2.5, (24, 32), (0, 0), (24, 32),
                                                 torch.float32, pipe.text_encoder.config.projection_dim)
    ours = [pipe.conditioner.added(1, 24, 32, None, negative)["time_ids"] for negative in (False, True)]
    torch.testing.assert_close(ours[0], ids)
    torch.testing.assert_close(ours[1], negative_ids)
    image = pipe(PROMPTS[0], steps=3, height=16, width=16, seed=0, progress=False)[0]
    assert image.size == (16, 16)


def test_refiner_redraws_an_image(refiner):
    from PIL import Image

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    pipe = Pipeline.from_pretrained(refiner)
    out = pipe.img2img(PROMPTS[0], source, strength=0.3, steps=4, seed=1, progress=False, output_type="np")
    assert out.shape == (1, 16, 24, 3) and np.isfinite(out).all()
    again = pipe.img2img(PROMPTS[0], source, strength=0.3, steps=4, seed=1, progress=False, output_type="np")
    assert np.array_equal(out, again)


def test_generate_and_batch_cli_on_sdxl(base, tmp_path, capsys):
    import json

    from PIL import Image

    from ldm.cli import main

    png = tmp_path / "xl.png"
    assert main(["generate", "a (red:1.2) apple", "--model", str(base), "-o", str(png), "--steps", "3",
                 "--height", "16", "--width", "24", "--seed", "4", "-q"]) == 0
    with Image.open(png) as im:
        settings, first = json.loads(im.info["ldm"]), np.asarray(im.convert("RGB"))
    assert (settings["model"], settings["guidance"], settings["prompt"]) == ("base", 5.0, "a (red:1.2) apple")
    assert main(["generate", "--from-png", str(png), "--model", str(base), "-o", str(tmp_path / "again.png"),
                 "-q"]) == 0
    with Image.open(tmp_path / "again.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red apple"}\n{"prompt": "a (red:1.2) apple", "seed": 4}\n')
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--model", str(base), "--steps", "3",
                 "--height", "16", "--width", "24", "-q"]) == 0
    made = sorted((tmp_path / "out").glob("*.png"))
    assert len(made) == 2
    # the batch's second line is the generate call above: same seed, same settings, same pixels
    assert any(np.array_equal(np.asarray(Image.open(p).convert("RGB")), first) for p in made)


def test_negative_given_per_image_zeros_only_where_none_was_given(base):
    """force_zeros_for_empty_prompt per image: [None, "blurry"] = zeros for the first, "blurry" for the second,
    each image exactly as when drawn alone."""
    pipe = Pipeline.from_pretrained(base)
    kw = dict(steps=3, guidance=5.0, sampler="ddim", height=16, width=16, output_type="np", progress=False)
    mixed = pipe(PROMPTS, negative_prompt=[None, "blurry"], seed=[1, 2], **kw)
    assert np.array_equal(mixed[0], pipe(PROMPTS[0], seed=1, **kw)[0])
    assert np.array_equal(mixed[1], pipe(PROMPTS[1], negative_prompt="blurry", seed=2, **kw)[0])
    assert not np.array_equal(mixed[0], pipe(PROMPTS[0], negative_prompt="", seed=1, **kw)[0])   # "" is encoded
