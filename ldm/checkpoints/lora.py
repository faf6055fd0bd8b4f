"""LoRA: low-rank adapters on attention projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"). A frozen weight W (out × in) is used as

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
from ldm.checkpoints.tensor_io import read_safetensors, write_safetensors

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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


def apply_lora(models: dict[str, nn.Module], tensors: dict[str, torch.Tensor], rank: int, alpha: float,
               scale: float = 1.0) -> None:
    """Attach adapters with the given weights to the layers the file names; strict about missing layers."""
    wanted: dict[str, set[str]] = {}
    for key in tensors:
        prefix, rest = key.split(".", 1)
        wanted.setdefault(prefix, set()).add(rest.rsplit(".lora_", 1)[0])
    unknown = sorted(set(wanted) - set(models))
    if unknown:
        raise ValueError(f"LoRA file adapts {unknown}, which this model does not have")
    for prefix, names in wanted.items():
        layers = {_key_name(n): m for n, m in models[prefix].named_modules() if isinstance(m, nn.Linear)}
        missing = sorted(n for n in names if n not in layers)
        if missing:
            raise ValueError(f"LoRA file names {len(missing)} {prefix} layer(s) this model lacks, e.g. {missing[:3]}")
        for name in sorted(names):
            layer = layers[name]
            w = layer.weight
            lora = LoRAWeight(w.shape[0], w.shape[1], rank, alpha, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lora.lora_A.copy_(tensors[f"{prefix}.{name}.lora_A.weight"])
                lora.lora_B.copy_(tensors[f"{prefix}.{name}.lora_B.weight"])
            lora.scale = scale
            lora.requires_grad_(False)
            parametrize.register_parametrization(layer, "weight", lora)


def set_scale(model: nn.Module, scale: float) -> None:
    for lora in adapters(model).values():
        lora.scale = float(scale)


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


class LoRAHandle:
    """What ``Pipeline.load_lora`` returns: change the scale, fuse into the weights, or unload."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models

    def set_scale(self, scale: float) -> None:
        for m in self.models.values():
            set_scale(m, scale)

    def fuse(self) -> None:
        for m in self.models.values():
            fuse(m)

    def unload(self) -> None:
        for m in self.models.values():
            unload(m)


def load_lora(pipe, path: str | Path, scale: float = 1.0) -> LoRAHandle:
    """Apply the LoRA file at ``path`` to a Pipeline's U-Net (and text encoder) at ``scale``."""
    tensors, rank, alpha = read_lora(path)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    used = {k.split(".", 1)[0] for k in tensors}
    apply_lora({k: v for k, v in models.items() if k in used}, tensors, rank, alpha, scale)
    return LoRAHandle({k: v for k, v in models.items() if k in used})
