"""The tiny autoencoder TAESD / TAESDXL (Ollin Boer Bohan, github.com/madebyollin/taesd): a VAE distilled into
plain 3×3 convolutions and ReLUs, 1.2 M parameters per half instead of the SD VAE's 34 M + 49 M, that encodes to
and decodes from the same latent space as the SD (TAESD) or SDXL (TAESDXL) VAE.

Parameter names and shapes are those of diffusers' AutoencoderTiny (diffusers/models/autoencoders/
autoencoder_tiny.py, EncoderTiny / DecoderTiny in vae.py, AutoencoderTinyBlock in unet_2d_blocks.py), so its
folders load strictly. The original release (``taesd_encoder.pth``, ``taesd_decoder.pth``) stores each half as
one ``nn.Sequential``: the encoder's indices are diffusers' own, the decoder's are one higher (the original puts
its clamp, a module without weights, at index 0): ``ORIGINAL_DECODER_OFFSET``.

Latent scale: TAESD was trained on the latents the U-Net sees, i.e. the SD VAE's latents already multiplied by its
scaling factor (0.18215 for SD, 0.13025 for SDXL). AutoencoderTiny therefore has ``scaling_factor`` 1.0 and
``shift_factor`` 0.0, and a pipeline that divides by the VAE's scaling factor before decoding (diffusers', ldm's)
hands TAESD its latents unchanged. Images are in [-1, 1] on both sides, as for AutoencoderKL; inside, the
original networks work on [0, 1] (the encoder maps x -> (x + 1) / 2 first, the decoder 2·y − 1 last), and the
decoder first soft-clamps its input to (−3, 3) with 3·tanh(z / 3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ldm.models.conv import Conv2d, inference_layout
from ldm.models.vae import apply_tiled

ORIGINAL_DECODER_OFFSET = 1     # original Sequential index = ours + 1 in the decoder (its Clamp is layer 0)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}
CLAMP = 3.0                     # the decoder's soft clamp: 3·tanh(z / 3)


@dataclass
class TinyVAEConfig:
    """Field names = diffusers AutoencoderTiny config.json keys; defaults are TAESD's."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: tuple[int, ...] | None = None   # diffusers registers the decoder's under this name too

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        if self.block_out_channels is None:
            self.block_out_channels = self.decoder_block_out_channels
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks):
            raise ValueError("encoder_block_out_channels and num_encoder_blocks differ in length")
        if len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ValueError("decoder_block_out_channels and num_decoder_blocks differ in length")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.upsample_fn not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"upsample_fn={self.upsample_fn!r} is not supported")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for TAESD): one stride-2 convolution per encoder level but the first."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> TinyVAEConfig:
        """From a diffusers config.json dict; "_"-prefixed keys ignored, unknown keys -> ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"AutoencoderTiny config has unknown key(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A diffusers config dict: AutoencoderTiny(**d) builds the same architecture."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class TinyBlock(nn.Module):
    """relu(conv3(act(conv2(act(conv1(x))))) + skip(x)): TAESD's residual block (diffusers' AutoencoderTinyBlock)."""

    def __init__(self, c_in: int, c_out: int, act_fn: str):
        super().__init__()
        act = ACTIVATIONS[act_fn]
        self.conv = nn.Sequential(Conv2d(c_in, c_out, 3, padding=1), act(), Conv2d(c_out, c_out, 3, padding=1),
                                  act(), Conv2d(c_out, c_out, 3, padding=1))
        self.skip = Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Image in [-1, 1] -> latents: per level a convolution (stride 2 after the first level) and its blocks."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            layers.append(Conv2d(cfg.in_channels, c, 3, padding=1) if i == 0 else
                          Conv2d(c, c, 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(c, c, cfg.act_fn) for _ in range(n)]
        layers.append(Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x + 1) / 2)


class TinyDecoder(nn.Module):
    """Latents -> image in [-1, 1]: soft clamp, a convolution, then per level its blocks, an upsampling and a
    convolution (the last level's maps to RGB)."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        channels = cfg.decoder_block_out_channels
        act = ACTIVATIONS[cfg.act_fn]
        layers: list[nn.Module] = [Conv2d(cfg.latent_channels, channels[0], 3, padding=1), act()]
        for i, (c, n) in enumerate(zip(channels, cfg.num_decoder_blocks)):
            last = i == len(channels) - 1
            layers += [TinyBlock(c, c, cfg.act_fn) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode=cfg.upsample_fn))
            layers.append(Conv2d(c, cfg.out_channels if last else c, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / CLAMP) * CLAMP) * 2 - 1


class TinyLatents:
    """What ``AutoencoderTiny.encode`` returns: the latents themselves (TAESD's encoder is deterministic), behind
    the interface of AutoencoderKL's posterior (``mode()``, ``sample()``, ``mean``) so callers need not care."""

    def __init__(self, latents: torch.Tensor):
        self.latents = self.mean = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


class AutoencoderTiny(nn.Module):
    """encode: images in [-1, 1] -> latents in the U-Net's scale; decode: those latents -> images in [-1, 1]."""

    post_quant_conv = None      # AutoencoderKL's interface (which may lack one too): TAESD has no quantisation convs

    def __init__(self, config: TinyVAEConfig | None = None, with_encoder: bool = True):
        """``with_encoder=False``: a decoder alone (the original taesd_decoder.pth without its encoder file)."""
        super().__init__()
        cfg = self.config = config or TinyVAEConfig()
        self.encoder = TinyEncoder(cfg) if with_encoder else None
        self.decoder = TinyDecoder(cfg)
        self.tiling = False
        self.tile_size = 512

    @property
    def dtype(self) -> torch.dtype:
        # a bias: reading a conv's weight would unpack it on a lean pipeline (ldm/models/conv.py)
        return self.decoder.layers[-1].bias.dtype

    def set_tiling(self, enabled: bool, tile_size: int | None = None) -> None:
        """Encode/decode images larger than ``tile_size`` pixels (default 512) tile by tile, with 25 % overlap
        blended linearly (``ldm.models.vae.apply_tiled``)."""
        size = tile_size or 512
        f = self.config.downscale
        if size % f or size < 2 * f:
            raise ValueError(f"VAE tile_size={size} must be a multiple of {f} and at least {2 * f}")
        self.tiling, self.tile_size = bool(enabled), size

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(inference_layout(x)).contiguous()

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(inference_layout(z)).contiguous()

    def encode(self, x: torch.Tensor) -> TinyLatents:
        """x (B, 3, H, W) in [-1, 1] -> latents (float32) in the U-Net's scale, behind ``.mode()``."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (only its decoder file was loaded; put taesd_encoder.pth "
                             "beside taesd_decoder.pth to encode images)")
        x = x.to(self.encoder.layers[0].bias.dtype)
        tile, f = self.tile_size, self.config.downscale
        if self.tiling and max(x.shape[-2:]) > tile:
            return TinyLatents(apply_tiled(self._latents, x, tile, tile // f).float())
        return TinyLatents(self._latents(x).float())

    def decode(self, z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """z (B, latent, h, w) in the U-Net's scale -> images (B, 3, 8h, 8w) in [-1, 1], in ``dtype`` (None: the
        weights' dtype, or float32 when ``config.force_upcast``); the decoder's weights convert in place."""
        dtype = dtype or (torch.float32 if self.config.force_upcast else self.dtype)
        self.set_decoder_dtype(dtype)
        z = z.to(dtype)
        tile, f = self.tile_size, self.config.downscale
        if self.tiling and max(z.shape[-2:]) > tile // f:
            return apply_tiled(self._image, z, tile // f, tile)
        return self._image(z)

    def set_decoder_dtype(self, dtype: torch.dtype) -> None:
        """Convert the decoder to ``dtype``, once, in place (AutoencoderKL's interface)."""
        if self.dtype != dtype:
            self.decoder.to(dtype)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] (TAESD's way of storing latents as 8-bit images): z / (2·magnitude) + shift."""
        return (z / (2 * self.config.latent_magnitude) + self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, u: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scale_latents`` (within its clamp)."""
        return (u - self.config.latent_shift) * (2 * self.config.latent_magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(x))."""
        return self.decode(self.encode(x).mode())


def original_key(key: str) -> tuple[str, str]:
    """Our (diffusers) key -> (which original file, its key there): ``encoder.layers.3.conv.0.weight`` lives in
    taesd_encoder.pth as ``3.conv.0.weight``; ``decoder.layers.3...`` in taesd_decoder.pth as ``4...``."""
    half, _, rest = key.partition(".layers.")
    index, _, inner = rest.partition(".")
    if half == "decoder":
        index = str(int(index) + ORIGINAL_DECODER_OFFSET)
    return half, f"{index}.{inner}"
