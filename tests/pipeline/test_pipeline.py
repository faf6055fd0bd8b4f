"""Pipeline, text-to-image: types and sizes, seeds, DDIM parity with diffusers, validation, options."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
import ldm.assets
import ldm.pipeline
from ldm import Pipeline
from ldm.samplers import SAMPLERS
from tiny_models import save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a turtle playing basketball"


@pytest.fixture(scope="module")
def folder(sd1_folder):
    return sd1_folder


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder)


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, ldm; print('torch' in sys.modules, ldm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", ldm.__version__]


def test_text_to_image_returns_documented_types_and_sizes(pipe):
    images = pipe([PROMPT, "a red apple"], steps=2, height=32, width=24, seed=0, num_images_per_prompt=2,
                  progress=False)
    assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
    assert all(im.size == (24, 32) and im.mode == "RGB" for im in images)
    info = json.loads(images[3].info["ldm"])
    assert (info["prompt"], info["seed"], info["width"], info["height"]) == ("a red apple", 3, 24, 32)
    array = pipe(PROMPT, steps=2, seed=0, output_type="np", progress=False)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor  # no size given: the model's own
    assert array.shape == (1, native, native, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    latents = pipe(PROMPT, steps=2, seed=0, height=32, width=16, output_type="latent", progress=False)
    assert latents.shape == (1, 4, 32 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_is_seeded(pipe, sampler):
    run = dict(steps=3, height=16, width=16, sampler=sampler, spacing="karras", progress=False, output_type="np")
    a, b = pipe(PROMPT, seed=5, **run), pipe(PROMPT, seed=5, **run)
    assert np.isfinite(a).all() and np.array_equal(a, b)


def test_same_seed_same_image_alone_and_in_a_batch_of_four(pipe):
    run = dict(steps=3, height=16, width=16, progress=False, output_type="np")
    for sampler in ("dpmpp_2m", "euler_a"):  # deterministic and ancestral (fresh noise every step)
        batch = pipe(PROMPT, seed=[7, 8, 9, 10], num_images_per_prompt=4, sampler=sampler, **run)
        alone = pipe(PROMPT, seed=9, sampler=sampler, **run)
        np.testing.assert_array_equal(batch[2], alone[0])  # bitwise: the U-Net runs row by row on the CPU
        assert np.abs(batch[2] - batch[1]).max() > 0.01  # and the seeds do make different images
    pipe.batch_invariant = False  # one batched U-Net call: the same image up to float rounding
    try:
        batch = pipe(PROMPT, seed=[7, 8, 9, 10], num_images_per_prompt=4, **run)
    finally:
        pipe.batch_invariant = True
    np.testing.assert_allclose(batch[2], pipe(PROMPT, seed=9, **run)[0], atol=1e-4)
    ints = pipe(PROMPT, seed=7, num_images_per_prompt=4, steps=3, height=16, width=16, progress=False)
    one = pipe(PROMPT, seed=9, steps=3, height=16, width=16, progress=False)[0]
    assert np.array_equal(np.asarray(ints[2]), np.asarray(one))  # seed=7 for 4 images means 7, 8, 9, 10


@pytest.mark.parametrize("family, prediction, spacing", [("sd1", "epsilon", "leading"),
                                                         ("sd2", "v_prediction", "trailing")])
def test_ddim_matches_diffusers(tmp_path, family, prediction, spacing):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = save_tiny_pipeline(tmp_path / family, family, prediction_type=prediction, seed=3)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "timestep_spacing": spacing}))
    theirs = StableDiffusionPipeline.from_pretrained(folder)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 24 // 2, 32 // 2, generator=torch.Generator().manual_seed(0))
    prompts = [PROMPT, "a red apple"]
    expected = theirs(prompts, negative_prompt=["blurry", ""], num_inference_steps=10, guidance_scale=7.5,
                      latents=latents, height=24, width=32, output_type="np").images
    ours = Pipeline.from_pretrained(folder)(prompts, negative_prompt=["blurry", ""], steps=10, guidance=7.5,
                                            sampler="ddim", latents=latents, height=24, width=32,
                                            output_type="np", progress=False)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(expected[0] - expected[1]).max() > 0.05  # the images are not trivially alike


def test_initial_noise_scale_follows_the_spacing(pipe):
    """VP start x_vp = n on discrete spacings is x = n·sqrt(1 + σ0²) in σ-space; karras starts at n·σ0."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for spacing in ("leading", "karras"):
        seen = []
        pipe(PROMPT, steps=2, height=16, width=16, latents=latents, spacing=spacing, sampler="euler",
             callback=seen.append, progress=False, output_type="latent")
        s0 = seen[0]["sigma"]
        scale = math.sqrt(1 + s0**2) if spacing == "leading" else s0
        torch.testing.assert_close(seen[0]["x"], latents * scale)
        assert [info["i"] for info in seen] == [0, 1]


def test_unconditional_context_is_encoded_once_per_call(pipe, monkeypatch):
    seen = []
    forward = pipe.text_encoder.forward
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda prompts, clip_skip=None: seen.append(prompts) or
                        forward(prompts, clip_skip=clip_skip))
    pipe.conditioner.clear_cache()     # other tests drew these prompts; the cache would answer for them
    pipe([PROMPT, PROMPT, "a red apple"], steps=4, height=16, width=16, seed=0, progress=False,
         output_type="latent")
    assert sorted(map(tuple, seen)) == [("",), ("a red apple",), (PROMPT,)]  # not once per step or per image
    seen.clear()
    pipe.conditioner.clear_cache()
    pipe(PROMPT, guidance=1.0, steps=2, height=16, width=16, seed=0, progress=False, output_type="latent")
    assert seen == [[PROMPT]]  # guidance 1 needs no unconditional branch
    pipe(PROMPT, steps=2, height=16, width=16, seed=0, progress=False, output_type="latent")
    assert seen == [[PROMPT], [""]]  # drawn again: the prompt comes from the cache, only the negative is new


def test_options_change_the_image(pipe):
    run = dict(steps=3, height=16, width=16, seed=1, progress=False, output_type="np")
    base = pipe(PROMPT, **run)
    for change in (dict(negative_prompt="blurry"), dict(guidance=2.0), dict(guidance_rescale=0.7),
                   dict(clip_skip=2), dict(sampler="ddim", eta=1.0), dict(spacing="trailing")):
        assert np.abs(pipe(PROMPT, **run, **change) - base).max() > 1e-3, change


def test_progress_bar_is_silenceable(pipe, capsys):
    pipe(PROMPT, steps=2, height=16, width=16, seed=0, progress=False, output_type="latent")
    assert capsys.readouterr().err == ""
    pipe(PROMPT, steps=2, height=16, width=16, seed=0, progress=True, output_type="latent")
    # the bar is drawn (at least "0/2" when it opens; how far it redraws before it is cleared depends on timing)
    assert "/2 [" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=3), "prompt must be a string or a list of strings"),
    (dict(prompt="x", height=30), "height=30 is not a multiple of 8"),
    (dict(prompt="x", width=0), "width must be a positive integer"),
    (dict(prompt="x", sampler="warp"), "unknown sampler 'warp'; known samplers: ddim"),
    (dict(prompt="x", spacing="cubic"), "unknown spacing 'cubic'"),
    (dict(prompt="x", steps=0), "steps must be an integer >= 1"),
    (dict(prompt="x", guidance=float("nan")), "guidance must be finite"),
    (dict(prompt="x", seed=[1, 2]), "seed lists 2 seeds for 1 images"),
    (dict(prompt="x", seed=-1), r"seeds must be in \[0, 2\*\*64\)"),
    (dict(prompt=["a", "b"], negative_prompt=["c", "d", "e"]), "negative_prompt has 3 entries for 2 prompts"),
    (dict(prompt="x", eta=0.5, sampler="euler"), "eta=0.5 is not valid for sampler 'euler'"),
    (dict(prompt="x", guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    (dict(prompt="x", output_type="jpeg"), "output_type must be one of"),
    (dict(prompt="x", latents=torch.zeros(1, 4, 3, 3)), r"latents must have shape \(1, 4, 8, 8\)"),
])
def test_bad_input_fails_before_any_model_runs(pipe, monkeypatch, kwargs, match):
    def forbidden(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        monkeypatch.setattr(module, "forward", forbidden)
    monkeypatch.setattr(pipe, "_network", forbidden)
    with pytest.raises(ValueError, match=match):
        pipe(**{"height": 16, "width": 16, **kwargs})


def test_bad_device_dtype_and_paths(folder, tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        Pipeline.from_pretrained(folder, device="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        Pipeline.from_pretrained(folder, dtype="fp8")
    with pytest.raises(ValueError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nothing")


def test_default_model_missing_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(ldm.assets, "DEFAULT_MODEL", tmp_path / "default")
    with pytest.raises(ldm.pipeline.DefaultModelMissing, match=r"not installed.*Pipeline.from_pretrained\(PATH\)"):
        Pipeline()


def test_default_model_loads_when_installed(monkeypatch, folder):
    monkeypatch.setattr(ldm.assets, "DEFAULT_MODEL", folder)
    image = Pipeline()(PROMPT, steps=2, seed=0, progress=False)[0]
    assert image.size == (16, 16)


def test_half_precision_decode_falls_back_to_float32(folder, monkeypatch):
    pipe = Pipeline.from_pretrained(folder, vae_dtype=torch.float16)
    latents = pipe(PROMPT, steps=2, height=16, width=16, seed=0, output_type="latent", progress=False)
    decode = pipe.vae.decode

    def overflowing(z, dtype=None):  # what an fp16 SD VAE does on some images
        out = decode(z, dtype=dtype)
        return out * float("nan") if dtype == torch.float16 else out

    monkeypatch.setattr(pipe.vae, "decode", overflowing)
    with pytest.warns(RuntimeWarning, match="gave NaN/inf; decoding in float32"):
        images = pipe.decode_latents(latents)
    reference = Pipeline.from_pretrained(folder).decode_latents(latents)
    torch.testing.assert_close(images, reference, atol=5e-3, rtol=0)  # weights were rounded to fp16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.decode_latents(latents)  # float32 from now on, no second warning


def test_memory_options_keep_the_image(folder):
    pipe = Pipeline.from_pretrained(folder)
    run = dict(steps=2, height=32, width=32, seed=0, progress=False, output_type="np")
    base = pipe(PROMPT, **run)
    pipe.enable_attention_slicing(1)
    np.testing.assert_allclose(pipe(PROMPT, **run), base, atol=1e-5)
    pipe.enable_vae_tiling(16)  # 16-pixel tiles over a 32-pixel image: blended seams, close but not equal
    assert np.abs(pipe(PROMPT, **run) - base).mean() < 0.05
    with pytest.raises(ValueError, match="CUDA"):
        pipe.enable_sequential_cpu_offload("cuda")
    with pytest.raises(ValueError, match="moves models to a CUDA device"):
        pipe.enable_sequential_cpu_offload("cpu")


def test_loaded_pipeline_keeps_one_copy_of_conv_weights_and_the_same_image(folder):
    from ldm.models.conv import Conv2d

    def released(p):
        return sum(m._plain_weight().numel() == 0 for m in p.unet.modules() if isinstance(m, Conv2d))

    lean, plain = Pipeline.from_pretrained(folder), Pipeline.from_pretrained(folder, lean=False)
    run = dict(steps=2, height=32, width=32, seed=0, progress=False, output_type="np")
    np.testing.assert_array_equal(lean(PROMPT, **run), plain(PROMPT, **run))
    assert lean.lean and released(lean) > 0 and not plain.lean and released(plain) == 0
    n = released(lean)
    assert (lean.unet.dtype, lean.vae.dtype) == (torch.float32, torch.float32) and released(lean) == n  # no unpacking
    for (name, a), b in zip(lean.unet.state_dict().items(), plain.unet.state_dict().values()):
        assert torch.equal(a, b), name                     # handing the weights out gives them back exactly
    lean(PROMPT, **run)
    assert not Pipeline(lean.components).lean and released(lean) == 0   # caller's modules: plain again
    assert lean.set_lean(True) is lean and lean(PROMPT, **run) is not None and released(lean) > 0


def test_save_pretrained_round_trip(pipe, tmp_path):
    run = dict(steps=2, height=16, width=16, seed=3, progress=False, output_type="np")
    saved = pipe.save_pretrained(tmp_path / "copy")
    again = Pipeline.from_pretrained(saved)
    np.testing.assert_array_equal(again(PROMPT, **run), pipe(PROMPT, **run))


def test_defaults_come_from_the_model_else_from_sd(pipe, monkeypatch):
    req = pipe.request(PROMPT)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert (req.steps, req.guidance, req.height, req.width) == (30, 7.5, native, native)
    for key, value in {"steps": 3, "guidance": 4.0, "size": 24}.items():
        monkeypatch.setitem(pipe.defaults, key, value)  # what a model folder's ldm.json suggests
    req = pipe.request(PROMPT, width=32)
    assert (req.steps, req.guidance, req.height, req.width) == (3, 4.0, 24, 32)


def test_compile_is_opt_in(folder):
    assert Pipeline.from_pretrained(folder)._network.__class__.__name__ == "UNet"
    compiled = Pipeline.from_pretrained(folder, compile=True)
    assert compiled._network.__class__.__name__ == "OptimizedModule" and compiled.unet is compiled._network._orig_mod


@pytest.mark.slow
def test_compiled_unet_draws_the_eager_image_and_reads_the_live_weights(folder):
    run = dict(steps=2, guidance=2.0, height=32, width=32, seed=0, progress=False, output_type="np")
    eager = Pipeline.from_pretrained(folder)
    compiled = Pipeline.from_pretrained(folder, compile=True)
    before = compiled(PROMPT, **run)[0]
    np.testing.assert_allclose(before, eager(PROMPT, **run)[0], atol=2e-4)
    for pipe in (eager, compiled):   # an in-place weight edit (what a LoRA does) reaches the compiled graph
        with torch.no_grad():
            pipe.unet.conv_out.bias.add_(0.5)
    after = compiled(PROMPT, **run)[0]
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(after, eager(PROMPT, **run)[0], atol=2e-4)


def test_load_lora_delegates_to_the_adapters_package(pipe, monkeypatch, tmp_path):
    import ldm.pipeline.core

    calls = []
    monkeypatch.setattr(ldm.pipeline.core, "load_adapter", lambda *args: calls.append(args) or "handle")
    assert pipe.load_lora(tmp_path / "style.safetensors", 0.5) == "handle"
    assert calls == [({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tmp_path / "style.safetensors", 0.5,
                      True, pipe.adapters, None)]


def test_per_image_calls_keep_an_images_guidance_branches_together():
    from ldm.pipeline.core import _PerImage

    calls = []

    def network(x, t, context):
        calls.append(x[:, 0, 0, 0].tolist())
        return x * 2 + t[:, None, None, None] + context.sum(1)[:, None, None, None]

    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 1, 1).contiguous()   # [uncond 0..2; cond 0..2]
    t, context = torch.arange(6.0), torch.ones(6, 3)
    out = _PerImage(network, blocks=2)(x, t, context=context)
    torch.testing.assert_close(out, x * 2 + t[:, None, None, None] + 3)   # rows back in their places
    assert calls == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]                     # image i: its uncond and cond rows
    calls.clear()
    torch.testing.assert_close(_PerImage(network, blocks=2, size=2)(x, t, context=context), out)
    assert calls == [[0.0, 1.0, 3.0, 4.0], [2.0, 5.0]]                       # groups of two images, then one
    calls.clear()
    torch.testing.assert_close(_PerImage(network, blocks=1, size=4)(x[:1], t[:1], context=context[:1]), out[:1])
    assert calls == [[0.0, 0.0]]                                              # never a call of one row
    with pytest.raises(ValueError, match="blocks"):
        _PerImage(network, blocks=4)(x, t, context=context)
