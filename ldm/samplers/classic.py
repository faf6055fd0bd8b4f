"""The classic samplers: DDPM, DDIM, Euler (ancestral), Heun, DPM-Solver-2, DPM-Solver++(2M) and its SDE form."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.samplers.base import Run, ancestral_sigmas


def _ancestral(run: Run, x: Tensor, eta: float) -> Tensor:
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        # Deterministic move to σ_down along the current ε estimate, then fresh noise of size σ_up.
        x = denoised + (x - denoised) * (down / sigma)
        if up > 0:
            x = x + run.noise(x) * up
    return x


@torch.no_grad()
def ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12); eta=0 is deterministic."""
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0, got {eta}")
    return _ancestral(Run(denoiser, sigmas, generator, callback), x, eta)


@torch.no_grad()
def euler_a(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0) -> Tensor:
    """Euler ancestral (Crowson, k-diffusion; Euler steps of Karras et al. 2022 plus DDPM-sized fresh noise)."""
    if eta < 0:
        raise ValueError(f"euler_a: eta must be >= 0, got {eta}")
    return _ancestral(Run(denoiser, sigmas, generator, callback), x, eta)


@torch.no_grad()
def ddpm(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_σ' | x_σ, x0) (Ho et al. 2020, eqs. 6-7)."""
    run = Run(denoiser, sigmas, generator, callback)
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        # In σ-space x_σ = x_σ' + sqrt(σ² − σ'²)·n, so the Gaussian posterior of x_σ' given x_σ and x0 has
        # mean x0 + (σ'/σ)²·(x_σ − x0) and variance σ'²·(σ² − σ'²)/σ² (eq. 7 divided by sqrt(ᾱ_prev)).
        ratio = (sigma_next / sigma) ** 2
        x = denoised + (x - denoised) * ratio
        if sigma_next > 0:
            x = x + run.noise(x) * (sigma_next / sigma * math.sqrt(sigma**2 - sigma_next**2))
    return x


@torch.no_grad()
def euler(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    run = Run(denoiser, sigmas, generator, callback)
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def _runge_kutta_2(run: Run, x: Tensor, probe: Callable[[float, float], float], weight: float) -> Tensor:
    """Two-stage Runge–Kutta on the probability-flow ODE: an Euler step to a probe level σ_p, the slope there,
    and the step taken with (1 − w)·slope(σ) + w·slope(σ_p).  The last step to σ = 0, where the slope is
    undefined, is plain Euler (Karras et al. 2022, Algorithm 1, line 8)."""
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x - slope * sigma
            continue
        sigma_probe = probe(sigma, sigma_next)
        x_probe = x + slope * (sigma_probe - sigma)
        slope_probe = (x_probe - run.model(x_probe, sigma_probe)) / sigma_probe
        x = x + (slope * (1 - weight) + slope_probe * weight) * (sigma_next - sigma)
    return x


@torch.no_grad()
def heun(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    # Trapezoid rule: probe at the end of the step, average the two slopes.
    return _runge_kutta_2(Run(denoiser, sigmas, generator, callback), x, lambda s, s_next: s_next, 0.5)


@torch.no_grad()
def dpm_2(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2): a midpoint step in log σ."""
    # The midpoint in λ = −log σ is the geometric mean of σ and σ'; its slope alone makes the step.
    return _runge_kutta_2(Run(denoiser, sigmas, generator, callback), x, lambda s, s_next: math.sqrt(s * s_next),
                          1.0)


def _dpmpp_2m(run: Run, x: Tensor, eta: float) -> Tensor:
    """DPM-Solver++(2M) in λ = −log σ, as an ODE (η = 0) or SDE (η > 0) solver; h = λ' − λ = log(σ/σ').

    The SDE form (Lu et al. 2022, "DPM-Solver++", §4; k-diffusion's midpoint variant) keeps a fraction e^{−ηh}
    of the current noise and redraws the rest:
        x' = (σ'/σ)·e^{−ηh}·x + (1 − e^{−(1+η)h})·D + σ'·sqrt(1 − e^{−2ηh})·z,
    where D is the denoised estimate, corrected after the first step by a linear extrapolation through the
    last two estimates to the step's midpoint: D = x0_i + (x0_i − x0_{i−1})/(2r), r = h_{i−1}/h_i.
    With η = 0 this is DPM-Solver++(2M) (Algorithm 2): x' = (σ'/σ)·x − (e^{−h} − 1)·D.
    """
    previous, h_previous = None, None
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            keep = -math.expm1(-h - eta * h)
            d = denoised
            if previous is not None:
                d = denoised + (denoised - previous) * (h / (2 * h_previous))
            x = x * (sigma_next / sigma * math.exp(-eta * h)) + d * keep
            if eta > 0:
                x = x + run.noise(x) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
            h_previous = h
        previous = denoised
    return x


@torch.no_grad()
def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), multistep in λ = −log σ."""
    return _dpmpp_2m(Run(denoiser, sigmas, generator, callback), x, eta=0.0)


@torch.no_grad()
def dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", §4; midpoint form as in k-diffusion)."""
    if eta < 0:
        raise ValueError(f"dpmpp_2m_sde: eta must be >= 0, got {eta}")
    return _dpmpp_2m(Run(denoiser, sigmas, generator, callback), x, eta)


