"""Reproducible noise: drawn on the CPU from per-image generators, then moved to the caller's device.

One generator per image makes image i depend on its own seed only, whatever the batch size.  A single generator
draws the whole shape at once, exactly as diffusers' `randn_tensor` does (so ldm and diffusers see the same noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def _check_cpu(generator: torch.Generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"ldm draws noise on the CPU; got a generator on {generator.device}")
    return generator


def randn(shape, generator: Generators = None, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of `shape`, drawn on the CPU and moved to `device`.

    generator: None (torch's global CPU generator), one Generator (draws the whole shape), or a sequence of
    Generators, one per row of the batch (row i uses generator[i] only).  A one-element sequence counts as a
    single generator, as in diffusers.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        generators = [_check_cpu(g) for g in generator]
        if len(generators) == 1:
            generator = generators[0]
        else:
            if not shape or len(generators) != shape[0]:
                raise ValueError(f"got {len(generators)} generators for a batch of shape {shape}; "
                                 "pass one generator per row (or a single generator)")
            rows = [torch.randn((1,) + shape[1:], generator=g, device="cpu", dtype=dtype) for g in generators]
            return torch.cat(rows).to(device)
    if generator is not None:
        _check_cpu(generator)
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image."""
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
            raise ValueError(f"seeds must be integers, got {seed!r}")
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside [0, 2**64)")
        out.append(torch.Generator("cpu").manual_seed(seed))
    return out
