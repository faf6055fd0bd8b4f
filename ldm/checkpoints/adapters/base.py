"""The one small base every adapter type shares (the shape of ComfyUI's ``weight_adapter/base.py``).

An adapter type is a row of data: the tensor names it reads, one name only it has (so a file's layer is
recognised by its tensors), and a pure function from those tensors to the weight delta ΔW of one layer.
The loader adds ``scale · ΔW`` to the layer's weight; nothing here touches a model.

Scaling (kohya's sd-scripts and LyCORIS): a factorised delta of rank r is multiplied by ``alpha / r``; a file
without ``alpha`` means alpha = r (factor 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Tensors = Mapping[str, torch.Tensor]
DeltaFn = Callable[[Tensors, "float | None", tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class AdapterType:
    """One adapter family: ``delta(tensors, alpha, weight_shape) -> ΔW`` (float32, before the user's scale)."""

    name: str
    marker: str                     # how the names of this type's tensors, and no other's, begin
    names: tuple[str, ...]          # every tensor name it may read, ``alpha`` aside
    delta: DeltaFn

    def owns(self, tensors: Tensors) -> bool:
        return any(name.startswith(self.marker) for name in tensors)


def rank_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank (Hu et al. 2021 §4.1, as kohya's sd-scripts stores it); no alpha: 1."""
    return 1.0 if alpha is None else float(alpha) / rank


def as_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def rebuild_tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A Tucker-2 decomposed convolution kernel (Kim et al. 2016, "Compression of Deep Convolutional Neural
    Networks for Fast and Low Power Mobile Applications"): W[o, i, h, w] = Σ_ab core[a, b, h, w] U[o, a] V[i, b],
    with ``out_factor`` U (out, r) and ``in_factor`` V (in, r)."""
    return torch.einsum("abhw,oa,ib->oihw", core, out_factor, in_factor).contiguous()


def fit(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """ΔW in the layer's shape: equal, or equal up to trailing 1s (a 1×1 convolution adapting a linear layer
    or the reverse, as SD 1 and SD 2 differ in proj_in/proj_out); None when the shapes disagree."""
    def core(s) -> tuple[int, ...]:
        s = tuple(s)
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if tuple(delta.shape) == tuple(shape):
        return delta
    if core(delta.shape) == core(shape):
        return delta.reshape(shape)
    return None
