"""Helpers for the adapter tests: the same DDIM run through diffusers and ldm, adapter files written by the
real tools (PEFT through diffusers, LyCORIS' own networks), and random factors so no delta is zero."""
from __future__ import annotations

import numpy as np
import torch

PROMPTS = ["a photo of a red apple", "a blue square"]
STEPS, SIZE = 4, 32


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def diffusers_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, prompts=PROMPTS) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents(), height=SIZE,
                    width=SIZE, output_type="np").images


def ldm_images(pipe, prompts=PROMPTS, **kwargs) -> np.ndarray:
    return pipe(prompts, steps=STEPS, guidance=5.0, sampler="ddim", latents=latents(), height=SIZE, width=SIZE,
                output_type="np", progress=False, **kwargs)


def randomize(parameters, seed: int = 0, std: float = 0.2) -> None:
    """Fill adapter factors with N(0, std²) (trainers start B or one factor at zero: ΔW would be 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def peft_lora_file(pipe, folder, rank: int = 4, alpha: float = 8.0, seed: int = 0):
    """A diffusers-format LoRA file written by ``save_lora_weights`` from PEFT adapters on ``pipe``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS)
    text_cfg = LoraConfig(r=rank, lora_alpha=alpha / 2, target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)   # (transformers' add_adapter wants peft >= 0.22)
    randomize([p for n, p in pipe.unet.named_parameters() if "lora_" in n], seed)
    randomize([p for n, p in pipe.text_encoder.named_parameters() if "lora_" in n], seed + 1)
    unet_sd, text_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    type(pipe).save_lora_weights(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
                                 unet_lora_adapter_metadata=unet_cfg.to_dict(),
                                 text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors", unet_sd


# LyCORIS preset: SD's attention, resnets, samplers, conv_in/out and CLIP (its "full" preset also names the
# time embedding twice, by class and by name, which LyCORIS then refuses as a duplicated name).
LYCORIS_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def lycoris_network(pipe, algo: str, folder, seed: int = 0, multiplier: float = 1.0, **options):
    """LyCORIS' own kohya-style network (``lycoris.kohya.create_network``) on a diffusers pipeline, factors
    random, applied to the pipeline's modules (LyCORIS computes the forward)."""
    from lycoris.kohya import create_network

    preset = folder / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    net = create_network(multiplier, 4, 2.0, pipe.vae, pipe.text_encoder, pipe.unet, algo=algo,
                         preset=str(preset), **options)
    net.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    randomize([p for n, p in net.named_parameters() if "alpha" not in n and "scalar" not in n], seed, 0.35)
    return net
