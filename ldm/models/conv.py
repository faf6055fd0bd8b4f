"""Convolutions written as the matrix products they are, where that is faster on the CPU.

A k×k convolution is a GEMM between the (C_out, C_in·k²) weight matrix and the (C_in·k², H·W) matrix of
image patches ("im2col"; Chellapilla et al. 2006). oneDNN, which runs nn.Conv2d on the CPU, first converts
the weights to its blocked layout on every call; for the 1280-channel 3×3 kernels of SD's bottom levels that
is ~60 MB of traffic per call for a few dozen output pixels, more than the arithmetic. There an explicit
im2col + GEMM is 1.2-2.5x faster (measured on SD shapes, fp32, 1-2 threads). The parameters are nn.Conv2d's,
so state dicts are unchanged; results agree to float rounding.

`tokens_in` / `tokens_out` are the 1×1 projections between a (B, C, H, W) map and (B, H·W, C) tokens, written
as one batched GEMM each so that neither direction needs a permuted copy of the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# im2col pays off when the kernel is big (≥ 2^23 weights: C_in·C_out·9 for 1280 channels is 14.7M, for 640
# channels 3.7M) and the output small (≤ 512 positions over the batch: 2 × 16 × 16).
GEMM_MIN_WEIGHTS = 1 << 23
GEMM_MAX_POSITIONS = 512


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that switches to im2col + GEMM for large kernels on
    small CPU feature maps."""

    def _use_gemm(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or self.groups != 1 or x.dim() != 4 or not x.is_contiguous():
            return False
        if self.weight.numel() < GEMM_MIN_WEIGHTS or self.padding_mode != "zeros":
            return False
        h, w = self.output_size(x)
        return x.shape[0] * h * w <= GEMM_MAX_POSITIONS

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(
            (x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i] + 1
            for i in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_gemm(x):
            return super().forward(x)
        h, w = self.output_size(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C_in·k², h·w)
        out = torch.matmul(self.weight.flatten(1), cols)  # (B, C_out, h·w)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(x.shape[0], self.out_channels, h, w)


def tokens_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H·W, C_out) tokens through a 1×1 projection (conv weight (C_out, C, 1, 1) or
    linear weight (C_out, C)): tokens = x^T W^T + b. A channels-last map already is the (B, H·W, C) matrix."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return F.linear(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]), weight.flatten(1), bias)
    out = torch.matmul(x.flatten(2).transpose(1, 2), weight.flatten(1).t())
    return out if bias is None else out + bias


def tokens_out(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
               ) -> torch.Tensor:
    """(B, H·W, C_in) tokens -> (B, C_out, H, W) map through a 1×1 projection, in the memory format of the
    map `like` (channels-last: tokens W^T + b viewed as NHWC; otherwise W tokens^T + b, contiguous)."""
    b, _, h, w = like.shape
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return F.linear(tokens, weight.flatten(1), bias).view(b, h, w, -1).permute(0, 3, 1, 2)
    out = torch.matmul(weight.flatten(1), tokens.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(b, -1, h, w)
