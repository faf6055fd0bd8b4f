"""One call's settings (``Request``) and the checks every entry point runs on them before any heavy work: each
bad value raises a ValueError that names the argument and what it got."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ldm.pipeline.conditioning import SizeConditioning


@dataclass
class Request:
    """One call's validated settings, one entry per image in the list fields."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    sampler: str
    spacing: str | None
    eta: float
    height: int
    width: int
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    negative_given: list[bool] | None = None   # per image: was a negative prompt given? (None: all were; SDXL
                                               # uses zeros for those without, see conditioning)

    def __post_init__(self):
        if self.negative_given is None:
            self.negative_given = [True] * len(self.prompts)
    sizes: SizeConditioning | None = None   # SDXL micro-conditioning (None: the requested size, crop (0, 0))

    @property
    def batch(self) -> int:
        return len(self.prompts)


def as_prompts(value, name: str) -> list[str]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not prompts:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    return list(prompts)


def as_negatives(value, count: int) -> tuple[list[str], list[bool]]:
    """One negative prompt per prompt, and whether each was given: None (none given), a string (for all), or a
    list with one entry per prompt where None means none for that prompt."""
    if value is None:
        return [""] * count, [False] * count
    if isinstance(value, (list, tuple)):
        given = [e is not None for e in value]
        negatives = as_prompts(["" if e is None else e for e in value] if value else value, "negative_prompt")
    else:
        negatives, given = as_prompts(value, "negative_prompt"), [True]
    if len(negatives) == 1 and count > 1:
        negatives, given = negatives * count, given * count
    if len(negatives) != count:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {count} prompts")
    return negatives, given


def as_seeds(seed, count: int) -> list[int]:
    """One seed per image: None draws fresh ones, an int s gives s, s+1, ... (A1111's convention)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(count)]
    elif isinstance(seed, (list, tuple)) and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                 for s in seed):
        if len(seed) != count:
            raise ValueError(f"seed lists {len(seed)} seeds for {count} images; give one per image or one int")
        seeds = [int(s) for s in seed]
    else:
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    if any(not 0 <= s < 2**64 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**64), got {seeds}")
    return seeds


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def finite(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
