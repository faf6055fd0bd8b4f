"""AutoencoderKL: the KL-regularised autoencoder that maps images to the latent space of latent diffusion
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", §3 and appendix G;
the KL term is the VAE's, Kingma & Welling 2014).

Parameter names and shapes are those of diffusers' AutoencoderKL (diffusers/models/autoencoders/
autoencoder_kl.py and vae.py), with the mid-block attention under the current names to_q/to_k/to_v/to_out.0.

Numerics: `decode` computes in float32 by default (SD's VAE decoder overflows in float16 at large sizes);
`decode(z, dtype=...)` lets the caller choose. `encode` computes in the weights' dtype and returns the
latent distribution in float32. Latents are *unscaled* both ways: multiply by `config.scaling_factor`
before the U-Net, divide before decoding (diffusers does the same outside the VAE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import SpatialSelfAttention
from ldm.models.blocks import DownStage, MidStage, UpStage
from ldm.models.checkpointing import set_gradient_checkpointing
from ldm.models.conv import Conv2d, inference_layout

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour (diffusers' tile_overlap_factor)


@dataclass
class VAEConfig:
    """Field names = diffusers AutoencoderKL config.json keys. Defaults are Stable Diffusion's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] | None = None  # None -> one DownEncoderBlock2D per level
    up_block_types: tuple[str, ...] | None = None  # None -> one UpDecoderBlock2D per level
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        n = len(self.block_out_channels)
        for name, kind in (("down_block_types", DOWN), ("up_block_types", UP)):
            types = getattr(self, name)
            if types is None:
                types = (kind,) * n
                setattr(self, name, types)
            if len(types) != n or any(t != kind for t in types):
                raise ValueError(f"VAEConfig.{name}={list(types)}: expected {n} x {kind!r}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r} is not supported (only 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig.norm_num_groups={self.norm_num_groups} does not divide channels {bad}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """From a diffusers config.json dict; "_"-prefixed keys ignored, unknown keys -> ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"VAE config has unknown key(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A diffusers config dict: AutoencoderKL(**d) builds the same architecture."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2·C channels (mean first, then logvar).
    logvar is clamped to [-30, 20] as in the original LDM code."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·n, n ~ N(0, I) drawn on the generator's device (the CPU by convention) then moved."""
        device = generator.device if generator is not None else None
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _mid_attention(cfg: VAEConfig) -> Callable[[int], nn.Module] | None:
    if not cfg.mid_block_add_attention:
        return None
    return lambda c: SpatialSelfAttention(c, cfg.norm_num_groups)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2·latent, H/f, W/f): conv, downsampling resnet stages, mid block."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownStage(ch[max(i - 1, 0)], c, None, cfg.layers_per_block, downsample=i < len(ch) - 1,
                      downsample_padding=0, groups=cfg.norm_num_groups)
            for i, c in enumerate(ch)
        )
        self.mid_block = MidStage(ch[-1], None, attention=_mid_attention(cfg), groups=cfg.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h·f, w·f): conv, mid block, upsampling resnet stages."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidStage(rev[0], None, attention=_mid_attention(cfg), groups=cfg.norm_num_groups)
        self.up_blocks = nn.ModuleList(
            UpStage(rev[max(i - 1, 0)], c, None, cfg.layers_per_block + 1, upsample=i < len(rev) - 1,
                    groups=cfg.norm_num_groups)
            for i, c in enumerate(rev)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=1e-6)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade, in place, the first `extent` rows/columns (along dim) of tile b with the last ones of tile a:
    b[k] = a[-extent + k]·(1 − k/extent) + b[k]·(k/extent), a linear ramp across the overlap."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * b.dim()
    shape[dim] = extent
    w = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).to(b.dtype).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)


def apply_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int, tile_out: int
                ) -> torch.Tensor:
    """Apply `fn` (mapping a tile_in tile to a tile_out tile) over overlapping tiles of x and blend the seams.
    Tiles start every tile_in·(1 − overlap) pixels; each output tile keeps tile_out·(1 − overlap) pixels after
    its top/left overlap has been cross-faded with the tiles above/left (diffusers' tiled_encode/decode scheme,
    so results agree with diffusers' tiling)."""
    stride = int(tile_in * (1 - TILE_OVERLAP))
    extent = int(tile_out * TILE_OVERLAP)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, extent, dim=3)
        out_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(nn.Module):
    """encode: images in [-1, 1] -> DiagonalGaussian over unscaled latents; decode: unscaled latents -> images."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = self.config = config or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.tiling = False
        self.tile_size = cfg.sample_size

    @property
    def dtype(self) -> torch.dtype:
        # a norm's weight: reading a conv's would unpack it on a lean pipeline (ldm/models/conv.py)
        return self.decoder.conv_norm_out.weight.dtype

    def set_tiling(self, enabled: bool, tile_size: int | None = None) -> None:
        """Encode/decode images larger than `tile_size` pixels (default config.sample_size) tile by tile, with
        25% overlap blended linearly: memory stays bounded by one tile, at the price of faint seams."""
        size = tile_size or self.config.sample_size
        if size % self.config.downscale or size < 2 * self.config.downscale:
            raise ValueError(f"VAE tile_size={size} must be a multiple of {self.config.downscale} and at least "
                             f"{2 * self.config.downscale}")
        self.tiling, self.tile_size = bool(enabled), size

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_gradient_checkpointing(self, enabled)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(inference_layout(x))
        return (h if self.quant_conv is None else self.quant_conv(h)).contiguous()

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        z = inference_layout(z)
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> the posterior over unscaled latents (float32)."""
        x = x.to(self.dtype)
        tile, tile_latent = self.tile_size, self.tile_size // self.config.downscale
        if self.tiling and max(x.shape[-2:]) > tile:
            moments = apply_tiled(self._moments, x, tile, tile_latent)
        else:
            moments = self._moments(x)
        return DiagonalGaussian(moments.float())

    def decode(self, z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """z (B, latent, h, w) unscaled -> images (B, 3, 8h, 8w), roughly in [-1, 1], in `dtype`.

        dtype None -> float32 when config.force_upcast (the default), else the weights' dtype. If the decoder's
        weights are in another dtype they are converted once, in place (as diffusers' force_upcast does)."""
        dtype = dtype or (torch.float32 if self.config.force_upcast else self.dtype)
        self.set_decoder_dtype(dtype)
        z = z.to(dtype)
        tile, tile_latent = self.tile_size, self.tile_size // self.config.downscale
        if self.tiling and max(z.shape[-2:]) > tile_latent:
            return apply_tiled(self._image, z, tile_latent, tile)
        return self._image(z)

    def set_decoder_dtype(self, dtype: torch.dtype) -> None:
        """Convert the decoder (and post_quant_conv) to `dtype`, once, in place (as diffusers' force_upcast)."""
        if self.decoder.conv_in.weight.dtype != dtype:
            self.decoder.to(dtype)
            if self.post_quant_conv is not None:
                self.post_quant_conv.to(dtype)

    def forward(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Reconstruction: decode(sample or mode of encode(x))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())
