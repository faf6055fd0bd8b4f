"""Fast CPU paths for the convolutions and 1×1 projections of the U-Net and VAE (same parameters, same
state-dict keys, results equal to float rounding).

`Conv2d`: nn.Conv2d on the CPU hands each call to oneDNN, which first converts the weights to its blocked
layout, every call. For SD's 3×3 kernels on small maps that conversion costs as much as the convolution
(1280 channels: ~60 MB of traffic per call). Without autograd, on float32 CPU tensors, Conv2d converts the
weights once, keeps them, and calls oneDNN's convolution on the converted copy (the op torch.compile's CPU
backend uses). Measured on fp32, 1 thread: 1.1-2.3x faster per convolution on maps of at most 1024 output
positions (batch x height x width), slower on bigger ones, where the conversion is cheap next to the
arithmetic: there plain nn.Conv2d keeps the call (PACK_MAX_POSITIONS). A layer keeps its packed copy once it
has run on a small map: up to 2/3 of SD 1.5's U-Net again (+2.3 GB in fp32); set `Conv2d.prepack = False`
to trade the speed back. The output has the input's memory format, as with nn.Conv2d. With autograd, or when
oneDNN is unavailable, it is plain nn.Conv2d.

`tokens_in` / `tokens_out`: the 1×1 projections between a (B, C, H, W) map and (B, H·W, C) tokens as GEMMs
(conv and linear projections alike); back to the map, W·tokens^T lands in NCHW order with no permuted copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

PACK_MAX_POSITIONS = 1024


def _channels_last(x: torch.Tensor) -> bool:
    """Strictly channels-last (a tensor that is both, e.g. 1×1 maps, counts as plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, for inference on the CPU in float32, runs on weights converted once to oneDNN's layout."""

    prepack = True

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor that cannot be copied or pickled; it is remade on use.
        state = super().__getstate__()
        state.pop("_packed", None)
        return state

    def _packed_weight(self, x: torch.Tensor):
        """oneDNN-layout copy of the weight, made on first use and remade when the weight changes (new storage
        or an in-place update) or the input shape does; None when this layer or this build cannot use it.
        oneDNN chooses the blocked layout for the input shape it is given, and the layout decides the order of
        the sums: keying on the shape keeps an output independent of which shapes the layer saw before."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(x.shape))
        cached = self.__dict__.get("_packed")
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
        except (RuntimeError, AttributeError):
            packed = None
        self.__dict__["_packed"] = (key, packed)
        return packed

    def _output_positions(self, x: torch.Tensor) -> int:
        h, w = ((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in range(2))
        return x.shape[0] * h * w

    def _fast_path_applies(self, x: torch.Tensor) -> bool:
        return (self.prepack and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and self._output_positions(x) <= PACK_MAX_POSITIONS
                and torch.backends.mkldnn.is_available() and not parametrize.is_parametrized(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path_applies(x):
            packed = self._packed_weight(x)
            if packed is not None:
                out = torch.ops.mkldnn._convolution_pointwise(
                    x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    "none", [], "")
                # oneDNN answers channels-last; give back the input's layout, as nn.Conv2d does (GroupNorm, the
                # next op, is several times slower on channels-last CPU tensors).
                return out.contiguous(memory_format=torch.channels_last if _channels_last(x) else
                                      torch.contiguous_format)
        return super().forward(x)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C), contiguous (a free view of a channels-last map; otherwise a copy, which
    the linear layers that follow would make anyway, and slower, on a strided input)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def tokens_to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W) in the memory format of `like`."""
    b, c, h, w = like.shape
    if _channels_last(like):
        return tokens.view(b, h, w, c).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def tokens_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H·W, C_out) tokens through a 1×1 projection (conv weight (C_out, C, 1, 1) or
    linear weight (C_out, C)): tokens = x^T W^T + b."""
    return F.linear(map_to_tokens(x), weight.flatten(1), bias)


def tokens_out(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
               ) -> torch.Tensor:
    """(B, H·W, C_in) tokens -> (B, C_out, H, W) map through a 1×1 projection, in the memory format of the
    map `like` (channels-last: tokens W^T + b viewed as NHWC; otherwise W tokens^T + b, contiguous)."""
    b, _, h, w = like.shape
    if _channels_last(like):
        return tokens_to_map(F.linear(tokens, weight.flatten(1), bias), like)
    out = torch.matmul(weight.flatten(1), tokens.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(b, -1, h, w)
