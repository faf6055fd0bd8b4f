"""LoHa: the Hadamard product of two low-rank matrices (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard
Product for Communication-Efficient Federated Learning"), as LyCORIS stores it:

    ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b),      W1a, W2a: out × r;  W1b, W2b: r × (in·kh·kw),

so rank r per factor reaches rank r² in ΔW. Convolutions with LyCORIS' Tucker form (``use_tucker``) keep the
kernel in cores ``hada_t1`` / ``hada_t2`` (r, r, kh, kw); then W1a is r × out and W1b r × in.
"""
from __future__ import annotations

import torch

from ldm.checkpoints.adapters.base import AdapterType, Tensors, as_float, rank_scale, rebuild_tucker

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def _factor(t: Tensors, i: int, shape: tuple[int, ...]) -> torch.Tensor:
    a, b = as_float(t[f"hada_w{i}_a"]), as_float(t[f"hada_w{i}_b"])
    if f"hada_t{i}" in t:
        return rebuild_tucker(as_float(t[f"hada_t{i}"]), a.T, b.T)
    return (a @ b).reshape(shape)


def loha_delta(t: Tensors, alpha: float | None, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one LoHa layer in the layer's ``shape``."""
    rank = t["hada_w1_b"].shape[0]
    return _factor(t, 1, shape) * _factor(t, 2, shape) * rank_scale(alpha, rank)


LOHA = AdapterType("loha", "hada_", NAMES, loha_delta)
