"""LoRAs of the few-step models in their published layouts load and draw as diffusers' ``load_lora_weights``.

The published files (latent-consistency/lcm-lora-sdv1-5 ``pytorch_lora_weights.safetensors``, ByteDance's
``sdxl_lightning_4step_lora.safetensors``, ``Hyper-SD15-8steps-lora.safetensors`` /
``Hyper-SDXL-8steps-lora.safetensors``) are kohya-style files over diffusers' module names: ``lora_unet_`` +
the U-Net module path with "_" for "." + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, U-Net only
(stable-diffusion.cpp PR #955 lists LCM-LoRA as "unet|lora_down+lora_up+alpha|hf"). Their layers are those of
the LCM-LoRA distillation script (diffusers' examples/consistency_distillation/train_lcm_distill_lora_*.py,
``lora_target_modules``): attention, projections, feed-forward, every resnet conv, shortcut and time projection,
and the down/up samplers (rank 64, alpha 8 there; the Lightning and Hyper-SD files are the same size as the
LCM-LoRA of their family, 135 MB for SD 1.5 and 394 MB for SDXL). Here: those key names on tiny random models,
rank 4, random factors.
"""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_sdxl import save_tiny_sdxl

from ldm import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a photo of a red apple"

# diffusers' train_lcm_distill_lora_sd_wds.py / _sdxl_wds.py default ``lora_target_modules``
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def few_step_lora_file(unet, path, rank: int = 4, alpha: float = 8.0, seed: int = 0, std: float = 0.15):
    """A U-Net-only kohya file with the LCM-LoRA / Lightning / Hyper-SD key layout for ``unet`` (diffusers'):
    a down/up pair (a conv's down factor has the conv's kernel, its up factor is 1x1) and an alpha per layer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            down = (rank, module.in_channels, *module.kernel_size)
            up = (module.out_channels, rank, 1, 1)
        else:
            down, up = (rank, module.in_features), (module.out_features, rank)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=gen) * std
        tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=gen) * std
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path, len(tensors) // 3


def _latents(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _kinds(path):
    """Which kinds of layer the file holds (so the test shows it covers convs, shortcuts and samplers)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return {t for t in ("conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj",
                        "ff_net_0_proj", "attn2_to_k", "proj_in") if any(t in k for k in keys)}


# (name, sampler, spacing, diffusers scheduler, its config changes): each file with its own recipe
SD15_CASES = [
    ("lcm-lora-sdv1-5", "lcm", None, "LCMScheduler", {}),
    ("Hyper-SD15-8steps-lora", "ddim", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
]


@pytest.mark.parametrize("name,sampler,spacing,cls,changes", SD15_CASES)
def test_sd15_few_step_lora_matches_diffusers(sd1_folder, tmp_path, name, sampler, spacing, cls, changes):
    import diffusers
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(sd1_folder)
    theirs.set_progress_bar_config(disable=True)
    path, layers = few_step_lora_file(theirs.unet, tmp_path / f"{name}.safetensors", seed=len(name))
    assert _kinds(path) == {"conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj",
                            "ff_net_0_proj", "attn2_to_k", "proj_in"}
    config = {k: v for k, v in theirs.scheduler.config.items() if k != "_use_default_values"}
    theirs.scheduler = getattr(diffusers, cls).from_config({**config, **changes})
    theirs.load_lora_weights(str(path))
    latents = _latents((1, 4, 8, 8))
    with torch.no_grad():
        expected = theirs(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=latents, height=16, width=16,
                          output_type="np", generator=torch.Generator().manual_seed(3)).images
    ours = Pipeline.from_pretrained(sd1_folder)
    run = dict(steps=4, guidance=1.0, sampler=sampler, spacing=spacing, seed=3, latents=latents, height=16,
               width=16, output_type="np", progress=False)
    base = ours(PROMPT, **run)
    handle = ours.load_lora(path)
    assert handle.format == "kohya/A1111" and handle.layers == layers
    got = ours(PROMPT, **run)
    assert np.abs(got - expected).max() <= 2 / 255, np.abs(got - expected).max()
    assert np.abs(got - base).max() > 0.05                     # the LoRA changes the image: parity is not vacuous


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl_few") / "base", seed=7)


@pytest.mark.parametrize("name", ["sdxl_lightning_4step_lora", "Hyper-SDXL-8steps-lora"])
def test_sdxl_few_step_lora_matches_diffusers(xl, tmp_path, name):
    """SDXL-Lightning's recipe: Euler, trailing spacing, 4 steps, guidance 1 (its model card)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_pretrained(xl)
    theirs.set_progress_bar_config(disable=True)
    path, layers = few_step_lora_file(theirs.unet, tmp_path / f"{name}.safetensors", seed=len(name))
    assert {"conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj"} <= _kinds(path)
    config = {k: v for k, v in theirs.scheduler.config.items() if k != "_use_default_values"}
    theirs.scheduler = EulerDiscreteScheduler.from_config({**config, "timestep_spacing": "trailing"})
    theirs.load_lora_weights(str(path))
    latents = _latents((1, 4, 12, 16))
    with torch.no_grad():
        expected = theirs(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=latents, height=24, width=32,
                          output_type="np").images
    ours = Pipeline.from_pretrained(xl)
    run = dict(steps=4, guidance=1.0, sampler="euler", spacing="trailing", latents=latents, height=24, width=32,
               output_type="np", progress=False)
    base = ours(PROMPT, **run)
    handle = ours.load_lora(path)
    assert handle.format == "kohya/A1111" and handle.layers == layers
    got = ours(PROMPT, **run)
    assert np.abs(got - expected).max() <= 2 / 255, np.abs(got - expected).max()
    assert np.abs(got - base).max() > 0.05
