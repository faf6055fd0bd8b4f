"""LoRA: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Two halves. :data:`LORA` is the adapter type the loader reads from community files: kohya's ``lora_down`` /
``lora_up`` / ``alpha`` (PEFT's ``lora_A`` / ``lora_B`` are renamed to these on reading), linear or
convolutional (LyCORIS LoCon), with LoCon's Tucker ``lora_mid`` core. The rest trains adapters in ldm: a frozen
weight W (out × in) is used as

    W' = W + scale · (alpha / rank) · B A,      A: rank × in (random), B: out × rank (zeros at the start),

so training starts from the base model exactly and only A and B learn. The adapter is a weight
*parametrization* (``torch.nn.utils.parametrize``): every read of ``layer.weight`` sees W', which also covers
code that reads the weights directly (ldm's self-attention concatenates W_q, W_k, W_v into one GEMM).

Targets: the U-Net's ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and, optionally, the CLIP text encoder's
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``. Files are safetensors with PEFT-style names
(``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.<module>...``) and the rank and alpha in
the metadata.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from ldm.checkpoints.adapters.base import AdapterType, Tensors, as_float, rank_scale, rebuild_tucker
from ldm.checkpoints.tensor_io import read_safetensors, write_safetensors

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_delta(t: Tensors, alpha: float | None, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = (alpha / r) · up · down. Convolutions: down (r, in, kh, kw), up (out, r, 1, 1); with a LoCon Tucker
    core (LyCORIS ``use_tucker``) down (r, in, 1, 1) -> mid (r, r, kh, kw) -> up (out, r, 1, 1)."""
    down, up = as_float(t["lora_down.weight"]), as_float(t["lora_up.weight"])
    scale = rank_scale(alpha, down.shape[0])
    if "lora_mid.weight" in t:
        delta = rebuild_tucker(as_float(t["lora_mid.weight"]), up.flatten(1), down.flatten(1).T)
    else:
        delta = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            delta = delta.reshape(up.shape[0], down.shape[1], *down.shape[2:])
    return delta * scale


LORA = AdapterType("lora", "lora_down", ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
                   lora_delta)


class LoRAWeight(nn.Module):
    """The parametrization W -> W + scale · (alpha / rank) · B A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, *, device=None, dtype=None):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, float(alpha), 1.0
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's own initialisation, as Hu et al.

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        factor = self.scale * self.alpha / self.rank
        if factor == 0.0:
            return weight
        return weight + factor * (self.lora_B @ self.lora_A).to(weight.dtype)


def _key_name(name: str) -> str:
    """Module path without the wrappers that differ between ldm/transformers versions."""
    for prefix in ("model.", "text_model."):
        name = name.removeprefix(prefix)
    return name


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear layers whose path ends with one of ``targets`` (``to_out.0`` matches ``...attn1.to_out.0``)."""
    return {_key_name(n): m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


def adapters(model: nn.Module) -> dict[str, LoRAWeight]:
    """The LoRA parametrizations inside ``model``, by the name of the layer they adapt."""
    out = {}
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LoRAWeight):
                    out[_key_name(n)] = p
    return out


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = UNET_TARGETS
             ) -> list[nn.Parameter]:
    """Attach fresh adapters to every target layer; returns their parameters (the only ones to train)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    layers = target_layers(model, targets)
    if not layers:
        raise ValueError(f"no layers named {', '.join(targets)} in {type(model).__name__}")
    params = []
    for layer in layers.values():
        w = layer.weight
        lora = LoRAWeight(w.shape[0], w.shape[1], rank, alpha if alpha is not None else rank,
                          device=w.device, dtype=w.dtype)
        parametrize.register_parametrization(layer, "weight", lora)
        params += [lora.lora_A, lora.lora_B]
    return params


def lora_state_dict(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"unet": unet, "text_encoder": te}`` -> ``{"unet.<layer>.lora_A.weight": A, ...}``."""
    out = {}
    for prefix, model in models.items():
        for name, lora in adapters(model).items():
            out[f"{prefix}.{name}.lora_A.weight"] = lora.lora_A.detach()
            out[f"{prefix}.{name}.lora_B.weight"] = lora.lora_B.detach()
    return out


def save_lora(path: str | Path, models: dict[str, nn.Module]) -> Path:
    """Write the adapters of ``models`` (at least one must have some) to a safetensors file, atomically."""
    tensors = lora_state_dict(models)
    if not tensors:
        raise ValueError("save_lora: the models carry no LoRA adapters")
    first = next(a for m in models.values() for a in adapters(m).values())
    meta = {"ldm.lora.rank": str(first.rank), "ldm.lora.alpha": repr(first.alpha),
            "ldm.lora.modules": ",".join(sorted({k.split(".", 1)[0] for k in tensors}))}
    path = Path(path)
    write_safetensors(path, {k: v.float() for k, v in tensors.items()}, meta)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """(tensors, rank, alpha) of a file written by :func:`save_lora`."""
    tensors, meta = read_safetensors(path, "LoRA file")
    if "ldm.lora.rank" not in meta:
        raise ValueError(f"{path} is not an ldm LoRA file (no ldm.lora.rank metadata)")
    return tensors, int(meta["ldm.lora.rank"]), float(meta["ldm.lora.alpha"])


def _remove(model: nn.Module, keep: bool) -> None:
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, LoRAWeight)
                                                            for p in m.parametrizations.weight):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=keep)


def fuse(model: nn.Module) -> None:
    """Bake W' = W + scale·(alpha/rank)·BA into the weights and drop the adapters (no per-call cost)."""
    _remove(model, keep=True)


def unload(model: nn.Module) -> None:
    """Drop the adapters and return to the base weights W."""
    _remove(model, keep=False)
