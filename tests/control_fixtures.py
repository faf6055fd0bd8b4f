"""Tiny random ControlNets and T2I-Adapters for the tiny SD models of tiny_models.py, and their files in the
layouts people download: diffusers folders, lllyasviel's original ControlNet layout, TencentARC's T2I layout.

The original-layout files are written here as the inverse of the key pairing diffusers' ``from_single_file``
reads (``convert_controlnet_checkpoint``); tests load them back with diffusers to confirm the layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import perturb

CONTROL_SCALE = 0.05    # weight noise: the zero convs start at zero, so this is what makes the control act


def tiny_controlnet(unet, seed: int = 5, **config):
    """A diffusers ControlNetModel copying ``unet`` (a diffusers UNet2DConditionModel); the hint embedding halves
    the image once per extra width (tiny_models' VAE: 2x)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config.setdefault("conditioning_embedding_out_channels", (16, 32))
    return perturb(ControlNetModel.from_unet(unet, **config), seed, CONTROL_SCALE).eval()


def tiny_t2i_adapter(unet, seed: int = 6, adapter_type: str = "full_adapter", in_channels: int = 3):
    """A diffusers T2IAdapter for ``unet``: features at the tiny U-Net's widths, unshuffled by the VAE's 2x."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels), num_res_blocks=2,
                         downscale_factor=2, adapter_type=adapter_type)
    return perturb(adapter, seed, 0.05).eval()


def write_original_controlnet(controlnet, path: Path, prefix: str = "control_model.") -> Path:
    """A diffusers ControlNetModel's weights in lllyasviel's original layout (the inverse of diffusers'
    convert_controlnet_checkpoint), as .safetensors or .pth by the suffix."""
    from ldm.checkpoints.control_keys import controlnet_key

    cfg = controlnet.config
    levels = len(cfg.block_out_channels)
    layers = [cfg.layers_per_block] * levels if isinstance(cfg.layers_per_block, int) else list(cfg.layers_per_block)
    hint_blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    state = {prefix + controlnet_key(k, layers, hint_blocks): v.detach().clone().contiguous()
             for k, v in controlnet.state_dict().items()}
    _save(state, path)
    return path


def write_tencentarc_adapter(adapter, path: Path) -> Path:
    """A diffusers T2IAdapter's weights in TencentARC's layout (``Adapter`` / ``Adapter_light``)."""
    from ldm.checkpoints.control_keys import t2i_key

    cfg = adapter.config
    state = {t2i_key(k, cfg.adapter_type, cfg.num_res_blocks): v.detach().clone().contiguous()
             for k, v in adapter.state_dict().items()}
    _save(state, path)
    return path


def _save(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
