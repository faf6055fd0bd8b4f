"""Convolutional building blocks shared by the U-Net and the VAE: the timestep embedding, the residual block,
down/up-sampling, and the down / up / mid stages that chain them (optionally with attention).

The layout and parameter names follow diffusers' ResnetBlock2D, Downsample2D, Upsample2D and the
*Block2D classes of diffusers/models/unets/unet_2d_blocks.py, so their state dicts load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.checkpointing import Checkpointed
from ldm.models.conv import Conv2d, graph_capture
from ldm.models.upsample import Upsample

# Builds the attention module that follows each resnet of a stage, given the stage's channel count.
AttentionFactory = Callable[[int], nn.Module]


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 1e4
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), float32.

    Transformer position encoding (Vaswani et al. 2017, §3.5) as used by DDPM (Ho et al. 2020): frequencies
    f_i = max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2 - 1, features [sin(t f), cos(t f)], or
    [cos, sin] with flip_sin_to_cos (SD's order); an odd dim gets one zero column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None, :]
    parts = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def per_row(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a (B, C) batch of vectors, one row at a time without autograd, each row run as a pair of copies.
    CPU GEMM kernels pick their blocking (and so the order of each sum) by the number of rows: measured on SD's
    time-embedding layers, a row's value changes in the last bit with its batch mates. A one-row product takes
    the matrix-vector kernel, whose result depends on the weight's address alignment (a model loaded from a
    single file and from a folder then differ); two identical rows take the GEMM kernel, which does not. The
    cost is B small GEMMs (a few per resnet, on vectors, not maps)."""
    if torch.is_grad_enabled() or graph_capture():   # a compiled graph picks its own kernels
        return fn(x)
    return torch.cat([fn(row.expand(2, -1))[:1] for row in x.split(1)])


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal features: linear, SiLU, linear (keys linear_1, linear_2). With ``cond_dim`` (an
    LCM-distilled U-Net, Luo et al. 2023) a condition vector is first projected (``cond_proj``, no bias) and added
    to the features, as diffusers' TimestepEmbedding does."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None and self.cond_proj is not None:
            x = x + per_row(self.cond_proj, cond)
        return per_row(lambda r: self.linear_2(F.silu(self.linear_1(r))), x)


class ResnetBlock(Checkpointed):
    """Pre-activation residual block (He et al. 2016) with GroupNorm and SiLU; the projected timestep
    embedding, when given, is added between the two convolutions (Ho et al. 2020, appendix B).
    A 1x1 conv_shortcut matches channels when in != out. The output is (shortcut + h) / output_scale."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        *,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.output_scale = output_scale
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # In-place updates only where autograd does not need the overwritten value: conv outputs always,
        # activations only without autograd (SiLU's backward needs its input).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None and temb is not None:
            h += per_row(self.time_emb_proj, F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        h += x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h if self.output_scale == 1.0 else h / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 convolution. padding=0 pads one pixel on the right and bottom only (the VAE encoder's
    asymmetric padding from the original LDM code)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _apply_attention(attn: nn.Module, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return attn(h) if context is None else attn(h, context)


class _Stage(nn.Module):
    """Resnets (one per entry of in_channels, all to out_channels), each optionally followed by attention."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        temb_channels: int | None,
        attention: AttentionFactory | None,
        **resnet_options,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(c, out_channels, temb_channels, **resnet_options) for c in in_channels
        )
        if attention is not None:
            self.attentions = nn.ModuleList(attention(out_channels) for _ in in_channels)
        else:
            self.attentions = None

    def layer(self, i: int, h: torch.Tensor, temb: torch.Tensor | None, context: torch.Tensor | None):
        h = self.resnets[i](h, temb)
        if self.attentions is None:
            return h
        return _apply_attention(self.attentions[i], h, context)


class DownStage(_Stage):
    """One resolution level of an encoder path: `layers` resnets (each optionally followed by attention),
    then an optional stride-2 downsample. Returns the output and the skip tensors (one per resnet, plus the
    downsampled map), which the U-Net's up path consumes in reverse.

    Covers diffusers' CrossAttnDownBlock2D (attention given), DownBlock2D and, without time embedding and with
    downsample padding 0, the VAE's DownEncoderBlock2D."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int | None, layers: int, *,
        attention: AttentionFactory | None = None,
        downsample: bool = True,
        downsample_padding: int = 1,
        **resnet_options,
    ):
        inputs = [in_channels] + [out_channels] * (layers - 1)
        super().__init__(inputs, out_channels, temb_channels, attention, **resnet_options)
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_channels, downsample_padding)])
        else:
            self.downsamplers = None

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None,
        additional_residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``additional_residual``: added to the last layer's output (a T2I-Adapter's feature)."""
        skips = []
        for i in range(len(self.resnets)):
            h = self.layer(i, h, temb, context)
            if additional_residual is not None and i == len(self.resnets) - 1:
                h = h + additional_residual
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpStage(_Stage):
    """One resolution level of a decoder path: `layers` resnets (each optionally followed by attention), then
    an optional 2x upsample.

    With `skip_channels` (the U-Net), resnet i first concatenates the matching skip tensor from the down path
    (popped from the end, as the down path pushed them), so its input has prev + skip channels. Without
    (the VAE's UpDecoderBlock2D) it is a plain stack. Covers CrossAttnUpBlock2D, UpBlock2D, UpDecoderBlock2D.
    """

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int | None, layers: int, *,
        skip_channels: Sequence[int] | None = None,
        attention: AttentionFactory | None = None,
        upsample: bool = True,
        **resnet_options,
    ):
        skips = list(skip_channels) if skip_channels is not None else [0] * layers
        if len(skips) != layers:
            raise ValueError(f"UpStage needs one skip channel count per layer ({layers}), got {len(skips)}")
        inputs = [(in_channels if i == 0 else out_channels) + skips[i] for i in range(layers)]
        super().__init__(inputs, out_channels, temb_channels, attention, **resnet_options)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(
        self,
        h: torch.Tensor,
        skips: Sequence[torch.Tensor] | None = None,
        temb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        for i in range(len(self.resnets)):
            if skips is not None:
                h = torch.cat([h, skips[-1 - i]], dim=1)
            h = self.layer(i, h, temb, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


class MidStage(nn.Module):
    """The bottleneck: resnet, attention, resnet (diffusers' UNetMidBlock2DCrossAttn with cross-attention, the
    VAE's UNetMidBlock2D with single-head self-attention; `attention=None` leaves just the two resnets)."""

    def __init__(
        self,
        channels: int,
        temb_channels: int | None,
        *,
        attention: AttentionFactory | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_channels, groups=groups, eps=eps, dropout=dropout,
                        output_scale=output_scale)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([attention(channels)]) if attention is not None else None

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        if self.attentions is not None:
            h = _apply_attention(self.attentions[0], h, context)
        return self.resnets[1](h, temb)
