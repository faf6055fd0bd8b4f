"""What every sampler shares: the σ-list check, the run's book-keeping (denoiser calls, step reports, fresh
noise), the ancestral split of a step, and the schedule hints a sampler may carry."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.denoiser import batch_sigma
from ldm.rng import Generators, randn


def check_sigmas(sigmas) -> list[float]:
    """Validate a σ sequence and return it as Python floats (float64).

    It must be 1-D with at least two entries (one step), finite, non-negative and strictly decreasing.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu() if not torch.is_tensor(sigmas) \
        else sigmas.detach().to("cpu", torch.float64)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    if len(s) < 2:
        raise ValueError(f"sigmas needs at least 2 entries (steps >= 1), got {len(s)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        bad = int(torch.nonzero(~torch.isfinite(s) | (s < 0))[0])
        raise ValueError(f"sigmas must be finite and >= 0: sigmas[{bad}] = {float(s[bad])}")
    rising = torch.nonzero(s[1:] >= s[:-1])
    if len(rising):
        i = int(rising[0]) + 1
        raise ValueError(f"sigmas must be strictly decreasing: sigmas[{i}] = {float(s[i]):.6g} >= "
                         f"sigmas[{i - 1}] = {float(s[i - 1]):.6g} (first bad index {i})")
    return s.tolist()


class Run:
    """Book-keeping shared by the samplers: σ list, denoiser calls, step reports and noise."""

    def __init__(self, denoiser, sigmas, generator: Generators, callback: Callable | None):
        self.denoiser = denoiser
        self.sigmas = check_sigmas(sigmas)
        self.steps = len(self.sigmas) - 1
        self.generator = generator
        self.callback = callback

    def __iter__(self):
        for i in range(self.steps):
            yield i, self.sigmas[i], self.sigmas[i + 1]

    def model(self, x: Tensor, sigma: float) -> Tensor:
        return self.denoiser(x, batch_sigma(sigma, x))

    def denoise(self, i: int, x: Tensor) -> Tensor:
        """D(x; sigmas[i]), reported to the callback."""
        denoised = self.model(x, self.sigmas[i])
        if self.callback is not None:
            self.callback({"i": i, "sigma": self.sigmas[i], "sigma_next": self.sigmas[i + 1], "x": x,
                           "denoised": denoised, "steps": self.steps})
        return denoised

    def noise(self, x: Tensor) -> Tensor:
        return randn(x.shape, self.generator, device=x.device, dtype=x.dtype)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step σ → σ' into a deterministic part down to σ_down and fresh noise σ_up, σ_down² + σ_up² = σ'².

    σ_up = η·σ'·sqrt(σ² − σ'²)/σ is the DDIM noise level (Song et al. 2021, eq. 16) written in σ-space; η = 1
    gives the DDPM posterior variance.
    """
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(sigma_next**2 - up**2), up




def schedule_hints(**hints) -> Callable:
    """Mark a sampler with the σ layout its reference scheduler uses, for callers that name none (the pipeline):
    spacing (LCM's distillation grid for lcm/tcd), final ("alpha0": stop at σ(t = 0), as TCDScheduler does) and
    convention (how "leading"/"linspace" lay out their steps, ``NoiseSchedule.timesteps``) and quantize (False:
    the network gets fractional timesteps, ``Denoiser(quantize=False)``). Read them with
    ``ldm.samplers.schedule_hints_of``."""
    def mark(fn: Callable) -> Callable:
        fn.schedule_hints = dict(hints)
        return fn
    return mark
