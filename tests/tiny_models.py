"""Tiny random SD-family models for tests: diffusers pipelines, their saved folders, ldm text encoders.

    pipe = tiny_diffusers_pipeline("sd2")                 # StableDiffusionPipeline, random tiny weights
    folder = save_tiny_pipeline(tmp_path / "sd1")         # the same, saved as a diffusers folder
    components = ldm.checkpoints.load(folder)

The architectures keep the SD structure (cross-attention on the upper levels, a plain bottom level, the SD 1.x
quirk of 8 heads, SD 2.x's 64 channels per head and linear projections) at a few hundred thousand
parameters, so a test builds, saves and runs them in well under a second. The text towers use CLIP's full
49,408-token vocabulary so the real (bundled) tokenizer drives them. Every parameter is perturbed by
noise after construction: no tensor stays at an init constant (all-ones norms, zero biases), so a test that
swaps two tensors by mistake fails. The sizes also follow the SD heuristics for what shapes cannot tell
(heads), so even a file with no ldm metadata loads back to the same architecture.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2")
TEXT_WIDTH = 64                       # one 64-channel head, as CLIP's heuristics (64 channels per head) expect


def tiny_unet_config(family: str = "sd1", inpaint: bool = False) -> dict:
    """A diffusers UNet2DConditionModel config with SD 1.x or SD 2.x structure."""
    _check_family(family)
    common = dict(sample_size=8, in_channels=9 if inpaint else 4, out_channels=4, norm_num_groups=32,
                  cross_attention_dim=TEXT_WIDTH,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    if family == "sd1":    # SD 1.x: 8 heads at every level (attention_head_dim is diffusers' head count)
        return {**common, "block_out_channels": [32, 64], "layers_per_block": 2, "attention_head_dim": 8}
    # SD 2.x: 64 channels per head, linear proj_in/proj_out
    return {**common, "block_out_channels": [64, 128], "layers_per_block": 1, "attention_head_dim": [1, 2],
            "use_linear_projection": True}


def tiny_vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=16,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def tiny_text_config(family: str = "sd1") -> dict:
    """transformers CLIPTextConfig kwargs: OpenAI-CLIP-like (QuickGELU) for SD 1.x, OpenCLIP-like (GELU,
    as diffusers stores SD 2.x's encoder) for SD 2.x."""
    _check_family(family)
    return dict(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
                num_attention_heads=1, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                hidden_act="quick_gelu" if family == "sd1" else "gelu")


def tiny_open_clip_config(layers: int = 3) -> dict:
    """An open_clip model config (as open_clip.get_model_config returns) for a tiny SD 2.x-like text tower."""
    return {"embed_dim": TEXT_WIDTH, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH,
                                                  "heads": 1, "layers": layers, "mlp_ratio": 2.0}}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add N(0, scale²) noise to every parameter (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return module


def tiny_tokenizer(family: str = "sd1"):
    """The bundled CLIP tokenizer, padding as the family's diffusers tokenizer does."""
    from transformers import CLIPTokenizer

    from ldm.assets import TOKENIZER_DIR

    pad = {"sd1": "<|endoftext|>", "sd2": "!"}[family]
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad, model_max_length=77)


def tiny_diffusers_pipeline(family: str = "sd1", inpaint: bool = False, seed: int = 0,
                            prediction_type: str = "epsilon"):
    """A diffusers StableDiffusionPipeline (StableDiffusionInpaintPipeline if ``inpaint``) with tiny random
    weights, SD's DDIM schedule settings, and no safety checker."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**tiny_unet_config(family, inpaint)), seed)
    vae = perturb(AutoencoderKL(**tiny_vae_config()), seed + 1)
    text_encoder = perturb(CLIPTextModel(CLIPTextConfig(**tiny_text_config(family))), seed + 2).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(family), unet=unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(folder, family: str = "sd1", inpaint: bool = False, seed: int = 0,
                       prediction_type: str = "epsilon", variant: str | None = None) -> Path:
    """Save :func:`tiny_diffusers_pipeline` as a diffusers folder (safetensors; ``variant="fp16"`` writes
    half-precision ``*.fp16.safetensors`` files as diffusers' fp16 variants are) and return its path."""
    pipe = tiny_diffusers_pipeline(family, inpaint, seed, prediction_type)
    if variant == "fp16":
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True, variant=variant)
    return Path(folder)


def tiny_text_encoder(family: str = "sd1", backend: str | None = None, seed: int = 0):
    """An ldm TextEncoder with tiny random weights: transformers backend for SD 1.x, open_clip for SD 2.x
    (3 layers, context from the penultimate) unless ``backend`` says otherwise."""
    from ldm.models.text import TextEncoder, TextEncoderConfig

    _check_family(family)
    backend = backend or ("transformers" if family == "sd1" else "open_clip")
    torch.manual_seed(seed)
    if backend == "open_clip":
        config = TextEncoderConfig.from_open_clip(tiny_open_clip_config(), family=family, skip_layers=1)
    else:
        config = TextEncoderConfig.from_dict({**tiny_text_config(family), "family": family})
    return perturb(TextEncoder(config), seed).eval()


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
