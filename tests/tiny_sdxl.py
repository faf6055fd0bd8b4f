"""Tiny random SDXL pipelines for tests: a base (CLIP-L + bigG-like encoders, 6 time ids) and a refiner
(bigG-like only, aesthetic score), built with diffusers/transformers classes and saved as diffusers folders.

    folder = save_tiny_sdxl(tmp_path / "xl")                 # StableDiffusionXLPipeline layout
    folder = save_tiny_sdxl(tmp_path / "ref", refiner=True)  # StableDiffusionXLImg2ImgPipeline layout
    folder = save_tiny_sdxl(tmp_path / "xl3", released=True)  # SDXL base's structure (3 levels, 4-level VAE)

Widths are multiples of 64 with 64 channels per head (as the real towers and SDXL's U-Net are), so shape
inference treats a single file of these weights as it treats the released ones. ``released=True`` gives the base
the released model's structure (3 U-Net levels of 2 resnets, no attention at the first; a 4-level VAE of 2
resnets a level), which diffusers' SDXL conversion script assumes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import perturb, tiny_tokenizer, tiny_vae_config

CLIP_L, BIG_G, TIME_DIM = 64, 128, 8     # text widths (bigG's projection = its width, as released) and time ids


def tiny_sdxl_unet_config(refiner: bool = False, released: bool = False) -> dict:
    context = BIG_G if refiner else CLIP_L + BIG_G
    ids = 5 if refiner else 6
    common = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                  projection_class_embeddings_input_dim=BIG_G + ids * TIME_DIM, cross_attention_dim=context,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    if released:
        return {**common, "block_out_channels": [64, 64, 128], "layers_per_block": 2, "attention_head_dim": [1, 1, 2],
                "transformer_layers_per_block": [1, 1, 2], "down_block_types": ["DownBlock2D"] + [
                    "CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]}
    if refiner:
        return {**common, "block_out_channels": [64, 128], "layers_per_block": 1, "attention_head_dim": [1, 2],
                "transformer_layers_per_block": 2}
    return {**common, "block_out_channels": [64, 128], "layers_per_block": 2, "attention_head_dim": [1, 2],
            "transformer_layers_per_block": [1, 2]}


def _text(width: int, act: str, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                         num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                         hidden_act=act)
    return perturb((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed).eval()


def tiny_sdxl_vae_config(released: bool = False) -> dict:
    if not released:
        return tiny_vae_config()
    return {**tiny_vae_config(), "block_out_channels": [32] * 4, "layers_per_block": 2, "sample_size": 64,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def tiny_sdxl_pipeline(refiner: bool = False, seed: int = 0, released: bool = False):
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**tiny_sdxl_unet_config(refiner, released)), seed)
    vae = perturb(AutoencoderKL(**tiny_sdxl_vae_config(released), scaling_factor=0.13025, force_upcast=True), seed + 1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    text_2 = _text(BIG_G, "gelu", True, seed + 3)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
                                                tokenizer_2=tiny_tokenizer("sd2"), unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=_text(CLIP_L, "quick_gelu", False, seed + 2),
                                     text_encoder_2=text_2, tokenizer=tiny_tokenizer("sd1"),
                                     tokenizer_2=tiny_tokenizer("sd2"), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


def save_tiny_sdxl(folder, refiner: bool = False, seed: int = 0, released: bool = False) -> Path:
    tiny_sdxl_pipeline(refiner, seed, released).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
