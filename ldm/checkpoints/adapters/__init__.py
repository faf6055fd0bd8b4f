"""Adapters: community LoRA / LyCORIS / diffusers-PEFT files onto ldm's models, and ldm's own trainable LoRA.

    handle = load_adapter({"unet": unet, "text_encoder": te}, "file.safetensors", scale=0.8, patches=registry)
    handle.remove()                                 # the weights exactly as before

One concept a module, over one small base (the layout of ComfyUI's ``weight_adapter/``):
  base      ``AdapterType``: an adapter type is data, a function from its tensors to a weight delta
  lora      LoRA / LoCon (+ Tucker ``lora_mid``), and ldm's trainable LoRA parametrization and file format
  loha      LoHa (Hadamard product of low-rank pairs)
  lokr      LoKr (Kronecker product)
  keys      the formats' key tables: kohya ``lora_unet_`` / ``lora_te_`` (SDXL ``lora_te1_`` / ``lora_te2_``),
            diffusers/PEFT ``unet.``/``text_encoder.`` with ``lora_A``/``lora_B``, old diffusers processors
  targets   a file's layer name -> the weight it means in ldm's U-Net / text encoder
  patches   W = W₀ + Σ sᵢ ΔWᵢ written in place, W₀ kept so removal is exact
  loader    ``load_adapter``: recognise, match, check shapes, patch; errors that name keys and shapes
  kohya     write ldm-trained adapters in kohya's format (what A1111 and ComfyUI load)

Imports: ``ldm.models`` and ``ldm.checkpoints``; never ``pipeline``, ``train``, ``batch`` or ``cli``.
"""

from ldm.checkpoints.adapters.loader import ADAPTER_TYPES, AdapterHandle, load_adapter, read_adapter_file
from ldm.checkpoints.adapters.patches import Patches

__all__ = ["ADAPTER_TYPES", "AdapterHandle", "Patches", "load_adapter", "read_adapter_file"]
