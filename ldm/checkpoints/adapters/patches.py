"""Adapters applied to weights, reversibly: W = W₀ + Σᵢ sᵢ ΔWᵢ written into the weight itself.

The untouched W₀ of every patched weight is kept on the CPU (as ComfyUI's ``ModelPatcher`` keeps its backup),
so removing any adapter rewrites W₀ + the others' deltas, and removing the last one puts W₀ back bit for bit.
Writing into the weights in place (rather than a parametrization) keeps every fast path: the packed
convolutions and the cross-attention K/V cache notice the new values through the tensor's version counter.
Deltas are recomputed from the adapters' factors (small) whenever a weight changes, in float32, then cast
to the weight's dtype.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ldm.checkpoints.adapters.base import AdapterType, fit
from ldm.checkpoints.adapters.targets import Target


@dataclass
class Patch:
    """One layer of one adapter: ``scale · kind.delta(tensors, alpha)`` added to ``target``."""

    owner: int
    target: Target
    kind: AdapterType
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    scale: float = 1.0
    group: str = ""                       # the model it belongs to ("unet", "text_encoder"), for per-model scales

    def delta(self, device: torch.device | None = None) -> torch.Tensor | None:
        """ΔW in the target's shape (float32, unscaled), or None when the adapter's shape does not fit."""
        tensors = {k: v.to(device) for k, v in self.tensors.items()} if device is not None else self.tensors
        return fit(self.kind.delta(tensors, self.alpha, self.target.shape), self.target.shape)


class Patches:
    """The adapters currently applied to a set of models, by owner (one owner per loaded file)."""

    def __init__(self):
        self._base: dict[tuple[int, str], tuple[Target, torch.Tensor]] = {}
        self._patches: dict[tuple[int, str], list[Patch]] = {}
        self._owners = itertools.count(1)

    def new_owner(self) -> int:
        return next(self._owners)

    @staticmethod
    def _key(target: Target) -> tuple[int, str]:
        return id(target.module), target.param

    def add(self, patches: list[Patch]) -> None:
        touched = set()
        for patch in patches:
            key = self._key(patch.target)
            if key not in self._base:
                weight = getattr(patch.target.module, patch.target.param)
                self._base[key] = (patch.target, weight.detach().to("cpu", copy=True))
            self._patches.setdefault(key, []).append(patch)
            touched.add(key)
        self._rewrite(touched)

    def owners(self) -> set[int]:
        return {p.owner for patches in self._patches.values() for p in patches}

    def set_scale(self, owner: int, scale: float, group: str | None = None) -> None:
        touched = set()
        for key, patches in self._patches.items():
            for p in patches:
                if p.owner == owner and (group is None or p.group == group):
                    p.scale = float(scale)
                    touched.add(key)
        self._rewrite(touched)

    def remove(self, owner: int) -> None:
        """Drop ``owner``'s patches; weights it alone touched get W₀ back exactly."""
        touched = {key for key, patches in self._patches.items() if any(p.owner == owner for p in patches)}
        for key in touched:
            self._patches[key] = [p for p in self._patches[key] if p.owner != owner]
        self._rewrite(touched)

    def bake(self, owner: int) -> None:
        """Make ``owner``'s deltas part of the base weights (``fuse``): they stay when others are removed."""
        touched = {key for key, patches in self._patches.items() if any(p.owner == owner for p in patches)}
        for key in touched:
            target, base = self._base[key]
            merged = base.float()
            for p in self._patches[key]:
                if p.owner == owner and p.scale:
                    merged[p.target.rows()] += p.scale * p.delta()
            self._base[key] = (target, merged.to(base.dtype))
            self._patches[key] = [p for p in self._patches[key] if p.owner != owner]
        self._rewrite(touched)

    def clear(self) -> None:
        """Remove every adapter: all patched weights back to W₀ exactly."""
        for key in self._patches:
            self._patches[key] = []
        self._rewrite(set(self._patches))

    @torch.no_grad()
    def _rewrite(self, keys: set[tuple[int, str]]) -> None:
        for key in keys:
            target, base = self._base[key]
            weight = getattr(target.module, target.param)
            active = [p for p in self._patches.get(key, []) if p.scale != 0.0]
            if not active:
                weight.copy_(base)
            else:
                merged = base.to(weight.device, torch.float32, copy=True)
                for p in active:
                    merged[p.target.rows()] += p.scale * p.delta(weight.device)
                weight.copy_(merged)
            if not self._patches.get(key):
                del self._base[key]
                self._patches.pop(key, None)

