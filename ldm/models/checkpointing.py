"""Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") as a mixin.

A module that mixes in `Checkpointed` implements `_forward`; when its `gradient_checkpointing` flag is on and
autograd is recording, the activations inside `_forward` are not kept but recomputed during the backward pass
(torch.utils.checkpoint, non-reentrant variant, which supports keyword-free calls and `torch.no_grad` inputs).
The gradients are the same; only memory and time change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    """Base for blocks whose forward can be recomputed in the backward pass instead of stored.

    Subclasses define `_forward(*args)` (positional arguments only, as torch.utils.checkpoint passes them)."""

    gradient_checkpointing: bool = False

    def forward(self, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn checkpointing on or off for every `Checkpointed` block inside `model`."""
    for module in model.modules():
        if isinstance(module, Checkpointed):
            module.gradient_checkpointing = bool(enabled)
