"""LoKr: a Kronecker product of two small factors (Yeh et al. 2024, "Navigating Text-To-Image Customization:
From LyCORIS Fine-Tuning to Model Evaluation", §3), as LyCORIS stores it:

    ΔW = s · W1 ⊗ W2,    W1: (out₁, in₁) = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
                         W2: (out₂, in₂[, kh, kw]) = ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or the Tucker form
                         with core ``lokr_t2``; out = out₁·out₂, in = in₁·in₂.

s = alpha / r where r is the rank of whichever factor is decomposed; with both factors full, s = 1 (LyCORIS'
``LokrModule``: "use scale = 1" when neither is low-rank).
"""
from __future__ import annotations

import math

import torch

from ldm.checkpoints.adapters.base import AdapterType, Tensors, as_float, rank_scale, rebuild_tucker

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _w1(t: Tensors) -> torch.Tensor:
    if "lokr_w1" in t:
        return as_float(t["lokr_w1"])
    return as_float(t["lokr_w1_a"]) @ as_float(t["lokr_w1_b"])


def _w2(t: Tensors) -> torch.Tensor:
    if "lokr_w2" in t:
        return as_float(t["lokr_w2"])
    a, b = as_float(t["lokr_w2_a"]), as_float(t["lokr_w2_b"])
    if "lokr_t2" in t:
        return rebuild_tucker(as_float(t["lokr_t2"]), a.T, b.T)
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])


def _rank(t: Tensors) -> int | None:
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in t:
            return t[name].shape[0]
    return None


def lokr_delta(t: Tensors, alpha: float | None, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one LoKr layer: W1 ⊗ W2, W1 broadcast over a convolution's kernel axes."""
    w1, w2 = _w1(t), _w2(t)
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    rank = _rank(t)
    scale = rank_scale(alpha, rank) if rank is not None else 1.0
    delta = torch.kron(w1, w2) * scale
    if delta.dim() != len(shape) and delta.numel() == math.prod(shape):
        delta = delta.reshape(shape)     # a flattened conv factor (r, in·kh·kw), as LyCORIS views it
    return delta


LOKR = AdapterType("lokr", "lokr_", NAMES, lokr_delta)
