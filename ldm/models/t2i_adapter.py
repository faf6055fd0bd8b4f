"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

A small convolutional network run once per control image (not once per step, as a ControlNet is): pixel
unshuffle to latent size, then one block per U-Net down level, each producing the feature map that is added
inside that level of the U-Net's encoder (``UNet.forward(..., down_intrablock_additional_residuals=)``).

Three variants, with diffusers' T2IAdapter parameter names (diffusers/models/adapter.py, ``adapter.*``):
  full_adapter     (SD 1.x/2.x) unshuffle 8; per level an optional 1×1 in_conv to the level's width after a
                   2× average pool (all levels but the first), then resnets (3×3 conv, ReLU, 1×1 conv, + input)
  full_adapter_xl  (SDXL) unshuffle 16; the pool only before the third block, matching SDXL's three levels
  light_adapter    per level 1×1 in_conv to a quarter width, resnets of two 3×3 convs, 1×1 out_conv
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.conv import Conv2d, inference_layout

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass
class T2IAdapterConfig:
    """diffusers T2IAdapter config.json keys."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"T2IAdapterConfig.adapter_type={self.adapter_type!r}; supported: {list(ADAPTER_TYPES)}")

    @classmethod
    def from_dict(cls, d: dict) -> T2IAdapterConfig:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"T2IAdapter config has unknown key(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"in_channels": self.in_channels, "channels": list(self.channels),
                "num_res_blocks": self.num_res_blocks, "downscale_factor": self.downscale_factor,
                "adapter_type": self.adapter_type}

    def feature_channels(self) -> tuple[int, ...]:
        """The width of each feature map the adapter returns, in order."""
        return (*self.channels, self.channels[-1]) if self.adapter_type == "light_adapter" else self.channels


class _Resnet(nn.Module):
    """x + block2(ReLU(block1(x))); block1 3×3, block2 1×1 (full) or 3×3 (light)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.block1 = Conv2d(channels, channels, 3, padding=1)
        self.block2 = Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(F.relu(self.block1(x))) + x


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class _Block(nn.Module):
    """[2× average pool] → [1×1 in_conv to the new width] → resnets (→ 1×1 out_conv, light)."""

    def __init__(self, c_in: int, c_out: int, resnets: int, down: bool, light: bool = False):
        super().__init__()
        self.down = down
        inner = c_out // 4 if light else c_out
        self.in_conv = Conv2d(c_in, inner, 1) if light or c_in != c_out else None
        self.resnets = nn.Sequential(*(_Resnet(inner, 3 if light else 1) for _ in range(resnets)))
        self.out_conv = Conv2d(inner, c_out, 1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pool(x) if self.down else x
        x = self.in_conv(x) if self.in_conv is not None else x
        x = self.resnets(x)
        return self.out_conv(x) if self.out_conv is not None else x


class _Adapter(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        c, n = cfg.channels, cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        unshuffled = cfg.in_channels * cfg.downscale_factor ** 2
        if cfg.adapter_type == "light_adapter":
            self.conv_in = None
            widths = [unshuffled, *c, c[-1]]
            self.body = nn.ModuleList(_Block(widths[i], widths[i + 1], n, down=i > 0, light=True)
                                      for i in range(len(c) + 1))
            return
        self.conv_in = Conv2d(unshuffled, c[0], 3, padding=1)
        if cfg.adapter_type == "full_adapter":
            self.body = nn.ModuleList(_Block(c[max(i - 1, 0)], c[i], n, down=i > 0) for i in range(len(c)))
        else:   # XL: level i of SDXL's U-Net halves the map only between blocks 1 and 2
            self.body = nn.ModuleList(_Block(c[max(i - 1, 0)] if i in (1, 2) else c[i], c[i], n, down=i == 2)
                                      for i in range(len(c)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(inference_layout(x))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """forward(image (B, in_channels, H, W) in [0, 1], in the adapter's dtype) -> one feature map per U-Net down
    level (unscaled)."""

    def __init__(self, config: T2IAdapterConfig | None = None):
        super().__init__()
        self.config = config or T2IAdapterConfig()
        self.adapter = _Adapter(self.config)

    @property
    def total_downscale_factor(self) -> int:
        cfg = self.config
        if cfg.adapter_type == "full_adapter_xl":
            return cfg.downscale_factor * 2
        return cfg.downscale_factor * 2 ** (len(cfg.channels) - (0 if cfg.adapter_type == "light_adapter" else 1))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.adapter(image)
