"""2× nearest-neighbour upsampling followed by a 3×3 convolution (diffusers' Upsample2D, key `conv`), with a
sub-pixel fast path for CPU inference on big maps.

Nearest upsampling repeats every input pixel in a 2×2 block, so a 3×3 kernel sliding over the upsampled map
sees at most 2×2 distinct input pixels for each output position, and which weights land on the same input
pixel depends only on the output's phase (its row and column parity). Summing those weights gives, per phase
(a, b), a 2×2 kernel over the *input* map:

    K_ab = F_a · W · F_bᵀ,   F_0 = [[1, 0, 0], [0, 1, 1]],   F_1 = [[1, 1, 0], [0, 0, 1]]

(row t of F_a lists the 3×3 taps that fall on input offset t - 1 + a). One convolution with the four kernels
stacked as output channels, on the input padded by one pixel, computes all four phases; phase (a, b) of output
pixel (i, j) is that convolution's (i + a, j + b). The result equals upsample-then-convolve up to float rounding
(the folded weights are summed before they multiply), with 16 multiply-adds per input pixel and channel pair
instead of 36: 2.25× fewer FLOPs and no 4×-sized intermediate. This is the sub-pixel convolution of Shi et al.
2016 ("Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural
Network") read backwards: a nearest upsample plus convolution *is* one, with tied weights.

The fast path runs without autograd on CPU float32/bfloat16 maps whose upsampled size, per image, is at least
`SUBPIXEL_MIN_POSITIONS` (32×32; the VAE decoder's upper levels, where these convolutions are a third of the
decode's FLOPs); smaller maps keep upsample-then-convolve through the packed `Conv2d`, where per-call overhead,
not arithmetic, is the cost. The size is an image's, never the batch's: the two paths round differently, so a
choice by batch size would make an image depend on its batch mates (ldm's batch invariance).
`Upsample.subpixel = False` turns it off. Training (autograd) always takes the plain path, so gradients are
exactly diffusers', and so does a network under torch.compile (the compiler sees the plain ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.conv import PACKED_DTYPES, Conv2d, graph_capture

SUBPIXEL_MIN_POSITIONS = 1024   # upsampled height x width of one image from which the sub-pixel path runs

# F_a of the module docstring: row t holds which of the 3 kernel taps fall on input offset t - 1 + a.
_FOLDS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel of a convolution applied after 2× nearest upsampling -> (4·O, I, 2, 2) kernel on the
    input map, phases (0, 0), (0, 1), (1, 0), (1, 1) stacked in that order. Summed in float32 (then cast back)."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"fold_weight needs a 3x3 kernel, got {tuple(weight.shape)}")
    folds = torch.tensor(_FOLDS, dtype=torch.float32, device=weight.device)
    w = weight.float()
    parts = [torch.einsum("tr,oirs,us->oitu", folds[a], w, folds[b]) for a, b in _PHASES]
    return torch.cat(parts).to(weight.dtype).contiguous()


def subpixel_upsample_conv(x: torch.Tensor, folded: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(upsample_nearest_2x(x)) from the folded kernel of `fold_weight` (and the conv's bias), in x's
    memory format."""
    b, _, h, w = x.shape
    out_channels = folded.shape[0] // 4
    phases = F.conv2d(x, folded, None if bias is None else bias.repeat(4), padding=1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = torch.empty((b, out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for k, (pa, pb) in enumerate(_PHASES):
        y[:, :, pa::2, pb::2] = phases[:, k * out_channels:(k + 1) * out_channels, pa:pa + h, pb:pb + w]
    return y


def subpixel_upsample_conv_graph(x: torch.Tensor, folded: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`subpixel_upsample_conv` in operators a graph compiler takes whole (no strided writes): the four phases
    cropped from the one convolution, stacked as channel groups and interleaved by a depth-to-space
    (`pixel_shuffle`, whose channel c·4 + 2a + b lands on pixel (2i + a, 2j + b))."""
    h, w = x.shape[-2:]
    out_channels = folded.shape[0] // 4
    phases = F.conv2d(x, folded, None if bias is None else bias.repeat(4), padding=1)
    crops = [phases[:, k * out_channels:(k + 1) * out_channels, pa:pa + h, pb:pb + w]
             for k, (pa, pb) in enumerate(_PHASES)]
    return F.pixel_shuffle(torch.stack(crops, dim=2).flatten(1, 2), 2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`, to match an odd-sized skip tensor), then a 3x3 conv."""

    subpixel = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def _subpixel_applies(self, x: torch.Tensor, size: Sequence[int] | None) -> bool:
        h, w = x.shape[-2:]
        return (self.subpixel and not torch.is_grad_enabled() and not graph_capture()
                and x.device.type == "cpu" and x.dim() == 4
                and (size is None or tuple(size) == (2 * h, 2 * w)) and x.dtype in PACKED_DTYPES
                and self.conv._plain_weight().dtype == x.dtype and 4 * h * w >= SUBPIXEL_MIN_POSITIONS)

    def _folded(self) -> torch.Tensor:
        """The folded kernel, made once per weight (remade when the weight's storage or version changes)."""
        weight = self.conv.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self.__dict__.get("_folded_cache")
        if cached is None or cached[0] != key:
            cached = (key, fold_weight(weight.detach()))
            self.__dict__["_folded_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if self._subpixel_applies(x, size):
            return subpixel_upsample_conv(x, self._folded(), self.conv.bias)
        h, w = x.shape[-2:]
        if (self.subpixel and torch.jit.is_tracing() and (size is None or tuple(size) == (2 * h, 2 * w))
                and 4 * h * w >= SUBPIXEL_MIN_POSITIONS):
            # a traced graph (the OpenVINO backend) takes the cheaper form too: SD 1.5's decode at 256², bf16,
            # 1.61-1.72 s -> 1.39-1.48 s in OpenVINO (docs/benchmarks.md)
            return subpixel_upsample_conv_graph(x, self._folded(), self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
