"""ldm-trained LoRA adapters in kohya's sd-scripts format, the one A1111, ComfyUI and diffusers'
``load_lora_weights`` read: ``lora_unet_<module path, "_" for ".">.lora_down.weight`` (ldm's A) /
``.lora_up.weight`` (B) / ``.alpha``, and ``lora_te_text_model_<path>`` for the CLIP text encoder
(sd-scripts' ``LoRANetwork.LORA_PREFIX_UNET`` / ``LORA_PREFIX_TEXT_ENCODER``); on SDXL ``lora_te1_`` and
``lora_te2_`` for its two encoders (sd-scripts' ``sdxl_train_network``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints.adapters.lora import adapters
from ldm.checkpoints.tensor_io import write_safetensors

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}


def kohya_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"unet": unet, "text_encoder": clip}`` (SDXL: also ``"text_encoder_2"``) with ldm adapters ->
    kohya-named tensors (float32)."""
    prefixes = SDXL_PREFIXES if "text_encoder_2" in models else PREFIXES
    out = {}
    for model, module in models.items():
        for name, lora in adapters(module).items():
            key = prefixes[model] + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = lora.lora_A.detach().float().contiguous()
            out[f"{key}.lora_up.weight"] = lora.lora_B.detach().float().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(lora.alpha))
    return out


def save_kohya(path: str | Path, models: dict[str, nn.Module]) -> Path:
    """Write the adapters of ``models`` as a kohya-format safetensors file (with sd-scripts' ``ss_network_*``
    metadata), atomically."""
    tensors = kohya_state_dict(models)
    if not tensors:
        raise ValueError("save_kohya: the models carry no LoRA adapters")
    first = next(a for m in models.values() for a in adapters(m).values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
            "ss_network_alpha": repr(first.alpha)}
    path = Path(path)
    write_safetensors(path, tensors, meta)
    return path
