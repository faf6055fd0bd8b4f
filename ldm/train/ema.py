"""Exponential moving average of model weights (Polyak & Juditsky 1992; as used for diffusion models since
Ho et al. 2020): θ_ema ← d·θ_ema + (1 − d)·θ after every optimiser step.

With ``warmup`` the decay ramps as d_n = min(decay, (1 + n) / (10 + n)), the schedule of the original LDM and
diffusers code, so that early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Shadow copies (float32) of the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        for n in self.names:
            # θ_ema ← θ_ema + (1 − d)(θ − θ_ema), the same as d·θ_ema + (1 − d)·θ with one fewer temporary
            self.shadow[n].lerp_(params[n].detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n].to(params[n].dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Run a block with the EMA weights in ``model``; the training weights come back afterwards."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(saved[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the update count rides along as a 0-d tensor."""
        return {**{f"shadow.{n}": t for n, t in self.shadow.items()},
                "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"shadow.{n}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state[f"shadow.{n}"])
        self.updates = int(state["updates"])
