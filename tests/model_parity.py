"""Helpers for the model parity tests: random weights shared by an ldm module and its diffusers twin."""

from __future__ import annotations

import torch
from torch import nn


POOL = 1_000_003  # prime, so a tensor's rows never repeat the pool in step


def _uniform(shape: torch.Size, bound: float, gen: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """U(±bound) samples; a tensor bigger than the pool is the pool repeated from a random offset, written in
    place (drawing 860M fresh numbers, or allocating temporaries, for a full-size U-Net is slower than the
    test itself)."""
    n = shape.numel()
    if n <= POOL:
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    out = torch.empty(n)
    start = int(torch.randint(POOL, (1,), generator=gen))
    out[:POOL - start].copy_(pool[start:])
    for i in range(POOL - start, n, POOL):
        out[i:i + POOL].copy_(pool[:n - i])
    return out.mul_(bound).view(shape)


def random_state(reference: nn.Module, seed: int = 0, *, tie_big: bool = False) -> dict[str, torch.Tensor]:
    """Random weights for every entry of reference.state_dict(): matrices/kernels ~ U(±1/sqrt(fan_in)) so
    activations keep their scale through deep networks; norm scales near 1; biases small but non-zero.

    tie_big: kernels of more than a million weights that have the same shape share one tensor. Full-size
    tests use it to stay within memory and time (faulting in 3.4 GB of fresh pages is slow on small VMs);
    the tiny tests, which give every tensor its own values, catch layers swapped within a shape."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL).uniform_(-1.0, 1.0, generator=gen)
    state, tied = {}, {}
    for name, value in reference.state_dict().items():
        if tie_big and value.dim() >= 2 and value.numel() > POOL:
            if value.shape not in tied:
                tied[value.shape] = _uniform(value.shape, value[0].numel() ** -0.5, gen, pool)
            t = tied[value.shape]
        elif value.dim() >= 2:
            t = _uniform(value.shape, value[0].numel() ** -0.5, gen, pool)
        else:
            t = torch.randn(value.shape, generator=gen) * 0.05
            if "norm" in name and name.endswith("weight"):
                t += 1.0
        state[name] = t
    return state


def share_weights(ours: nn.Module, theirs: nn.Module, seed: int = 0, *, tie_big: bool = False) -> None:
    """Load the same random weights into both (strict: ours must have exactly diffusers' keys and shapes).
    Modules built on the meta device get the tensors assigned (shared storage, no copies)."""
    state = random_state(theirs, seed, tie_big=tie_big)
    on_meta = next(ours.parameters()).is_meta
    theirs.load_state_dict(state, strict=True, assign=on_meta)
    ours.load_state_dict(state, strict=True, assign=on_meta)
    ours.eval()
    theirs.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
