"""ModelInfo: what a checkpoint holds, for ``ldm info`` and for callers that pick defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

FAMILY_NAMES = {"sd1": "SD 1.x (OpenAI CLIP text encoder)", "sd2": "SD 2.x (OpenCLIP text encoder)",
                "sdxl": "SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)",
                "sdxl_refiner": "SDXL refiner (OpenCLIP ViT-bigG text encoder, aesthetic score)"}


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


@dataclass
class ModelInfo:
    path: str
    format: str                           # "safetensors" | "ckpt" | "diffusers"
    family: str                           # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    inpainting: bool                      # the U-Net takes 9 channels: latents, mask, masked-image latents
    prediction_type: str                  # "epsilon" | "v_prediction" | "sample"
    resolution: int                       # native image side in pixels: U-Net sample size x VAE downscale
    sample_size: int                      # native latent side (the U-Net's sample_size)
    unet_in_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    context_dim: int
    text_layers: int                      # text transformer layers stored
    text_layer_used: int                  # the layer whose output is the context (1-based)
    text_backend: str                     # "transformers" | "open_clip"
    text_2: tuple[str, int, int] | None = None   # SDXL base's second encoder: (backend, layers, layer used)
    parameters: dict[str, int] = field(default_factory=dict)      # per component
    dtype: str = "float32"                # of the stored weights (the most common one)
    ema: bool = False                     # EMA weights present (and used by load unless use_ema=False)
    file_size: int = 0                    # bytes on disk (all weight files of a folder)

    def __str__(self) -> str:
        variant = ", inpainting" if self.inpainting else ""
        rows = [
            ("model", f"{self.path} ({self.format}, {_size(self.file_size)})"),
            ("family", FAMILY_NAMES.get(self.family, self.family) + variant),
            ("prediction", self.prediction_type),
            ("resolution", f"{self.resolution} x {self.resolution} px "
                           f"(latents {self.latent_channels} x {self.sample_size} x {self.sample_size})"),
            ("U-Net", f"{_count(self.parameters.get('unet', 0))} parameters; channels "
                      f"{', '.join(map(str, self.block_out_channels))}; {self.unet_in_channels} input channels; "
                      f"context {self.context_dim}"),
            ("VAE", f"{_count(self.parameters.get('vae', 0))} parameters; {self.latent_channels} latent channels"),
            ("text encoder", f"{_count(self.parameters.get('text_encoder', 0))} parameters; {self.text_backend}, "
                             f"{self.text_layers} layers, context from layer {self.text_layer_used}"),
            *([("text encoder 2", f"{_count(self.parameters.get('text_encoder_2', 0))} parameters; "
                                  f"{self.text_2[0]}, {self.text_2[1]} layers, context from layer {self.text_2[2]}")]
              if self.text_2 else []),
            ("dtype", self.dtype),
            ("EMA weights", "yes" if self.ema else "no"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
