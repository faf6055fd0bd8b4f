"""Single-step second-order samplers with fresh noise: DPM-Solver++(2S) ancestral and DPM-Solver++ SDE.

Both take each step in λ = −log σ with a probe at the step's midpoint in λ (r = 1/2, the geometric mean of the two
σ), two model calls a step. With eta = 0 both are DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.samplers.base import Run, ancestral_sigmas


def _first_order(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver++(1) from σ to σ_to: x' = (σ_to/σ)·x − (e^{−h} − 1)·x0 = x0 + (σ_to/σ)·(x − x0), h = log(σ/σ_to)."""
    return denoised + (x - denoised) * (sigma_to / sigma)


def _dpmpp_2s(run: Run, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """One DPM-Solver++(2S) step σ → σ_to from x with x0 estimate `denoised`: a first-order step to the λ-midpoint
    σ_s = sqrt(σ·σ_to), the model there, and the full first-order step with that estimate."""
    sigma_s = math.sqrt(sigma * sigma_to)
    return _first_order(x, run.model(_first_order(x, denoised, sigma, sigma_s), sigma_s), sigma, sigma_to)


@torch.no_grad()
def dpmpp_2s_a(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, "DPM-Solver++", Algorithm 1, r = 1/2; k-diffusion's ancestral
    form): the deterministic step goes to σ_down, then fresh noise of size σ_up."""
    if eta < 0:
        raise ValueError(f"dpmpp_2s_a: eta must be >= 0, got {eta}")
    run = Run(denoiser, sigmas, generator, callback)
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        if down == 0:
            x = denoised          # the Euler step to σ = 0
        else:
            x = _dpmpp_2s(run, x, denoised, sigma, down)
        if up > 0:
            x = x + run.noise(x) * up
    return x


@torch.no_grad()
def dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++ SDE (Lu et al. 2022, "DPM-Solver++", §4; k-diffusion's stochastic 2S with r = 1/2)."""
    if eta < 0:
        raise ValueError(f"dpmpp_sde: eta must be >= 0, got {eta}")
    run = Run(denoiser, sigmas, generator, callback)
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_s = math.sqrt(sigma * sigma_next)
        # The noise of both stages comes from one Brownian path W over σ (as k-diffusion's Brownian tree): the
        # probe's noise is the increment over [σ_s, σ], the step's the increment over [σ', σ], which contains it.
        # Drawn only when the steps add noise, so eta = 0 consumes none (as every ancestral sampler here).
        a, b = (run.noise(x), run.noise(x)) if eta > 0 else (0.0, 0.0)
        noise = (a * math.sqrt(sigma - sigma_s) + b * math.sqrt(sigma_s - sigma_next)) / math.sqrt(sigma - sigma_next)
        # Stage 1: an ancestral DPM-Solver++(1) step to the midpoint σ_s, and the model there.
        down, up = ancestral_sigmas(sigma, sigma_s, eta)
        denoised_s = run.model(_first_order(x, denoised, sigma, down) + a * up, sigma_s)
        # Stage 2: the ancestral step to σ' with the midpoint's estimate (DPM-Solver++(2S): 1/(2r) = 1).
        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        x = _first_order(x, denoised_s, sigma, down) + noise * up
    return x
