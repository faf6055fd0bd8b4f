"""Multistep samplers: each step reuses the x0 estimates of the steps before it (a local history, one model call
a step): linear multistep (LMS), UniPC, DPM-Solver++(3M) SDE."""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from ldm.samplers.base import Run, schedule_hints


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Adams–Bashforth weights over σ: ∫ from σ_i to σ_{i+1} of the Lagrange basis polynomials through
    σ_i, σ_{i−1}, ..., σ_{i−order+1}. The integrands are polynomials, integrated exactly."""
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        basis = np.array([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = P.polymul(basis, np.array([-other, 1.0]) / (node - other))
        antiderivative = P.polyint(basis)
        weights.append(float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)))
    return weights


# Fractional timesteps, as LMSDiscreteScheduler and k-diffusion feed them: on Karras levels crowded between integer
# timesteps, rounding makes the slopes jump, and the order-4 extrapolation through them amplifies the jumps
# (docs/samplers.md, the benchmark).
@schedule_hints(quantize=False)
@torch.no_grad()
def lms(denoiser, x, sigmas, *, generator=None, callback=None, order: int = 4) -> Tensor:
    """Linear multistep (Adams–Bashforth over σ) on the probability-flow ODE (Karras et al. 2022; k-diffusion)."""
    if order < 1:
        raise ValueError(f"lms: order must be >= 1, got {order}")
    run = Run(denoiser, sigmas, generator, callback)
    slopes: list[Tensor] = []          # dx/dσ at σ_i, σ_{i−1}, ... (newest first)
    for i, sigma, _ in run:
        slopes.insert(0, (x - run.denoise(i, x)) / sigma)
        del slopes[order:]
        weights = lms_coefficients(run.sigmas, i, len(slopes))
        x = x + sum(w * d for w, d in zip(weights, slopes))
    return x


def _unipc_b(h: float) -> tuple[float, float, float]:
    """B(h) = e^{−h} − 1 (UniPC's bh2 choice, data-prediction form) and the right-hand sides b_1, b_2 of its order
    conditions, b_k = k!·z·φ_{k+1}(z)/B(h) at z = −h, with φ_1(z) = (e^z − 1)/z and φ_{k+1}(z) = (φ_k(z) − 1/k!)/z
    (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models")."""
    hh = -h
    phi_1 = math.expm1(hh)
    g1 = phi_1 / hh - 1.0
    g2 = g1 / hh - 0.5
    return phi_1, g1 / phi_1, 2.0 * g2 / phi_1


@schedule_hints(convention="dpmsolver")
@torch.no_grad()
def unipc(denoiser, x, sigmas, *, generator=None, callback=None) -> Tensor:
    """UniPC, order 2, B(h) = e^h − 1 ("bh2"), data prediction (Zhao et al. 2023, "UniPC")."""
    run = Run(denoiser, sigmas, generator, callback)
    previous = None     # (x, σ, x0 estimate, order) of the last step, and the x0 estimate before it
    older = None
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        if previous is not None:
            # UniC: correct this step's predicted sample with the model output at it (no extra call). h and the
            # differences are those of the last step, σ_last → σ.
            x_last, sigma_last, d_last, order_last = previous
            h = math.log(sigma_last / sigma)
            phi_1, b1, b2 = _unipc_b(h)
            x = x_last * (sigma / sigma_last) - d_last * phi_1
            if order_last == 1:
                x = x - (denoised - d_last) * (phi_1 * 0.5)
            else:
                d_older, sigma_older = older
                r = -math.log(sigma_older / sigma_last) / h
                rho_0 = (b1 - b2) / (1.0 - r)
                x = x - ((d_older - d_last) / r * rho_0 + (denoised - d_last) * (b1 - rho_0)) * phi_1
        # Order: 1 on the first step (no history) and on the last (lower_order_final), 2 otherwise.
        order = 1 if previous is None or i == run.steps - 1 else 2
        if sigma_next == 0:
            x_next = denoised
        else:
            # UniP: the DPM-Solver++ step plus the B(h)-weighted first difference, ρ = 1/2 (bh2, order 2).
            h = math.log(sigma / sigma_next)
            phi_1 = math.expm1(-h)
            x_next = x * (sigma_next / sigma) - denoised * phi_1
            if order == 2:
                d_last, sigma_last = previous[2], previous[1]
                r = -math.log(sigma_last / sigma) / h
                x_next = x_next - (d_last - denoised) / r * (phi_1 * 0.5)
        older = None if previous is None else (previous[2], previous[1])
        previous = (x, sigma, denoised, order)
        x = x_next
    return x


@torch.no_grad()
def dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, "DPM-Solver++", §4 and Appendix; multistep form of k-diffusion)."""
    if eta < 0:
        raise ValueError(f"dpmpp_3m_sde: eta must be >= 0, got {eta}")
    run = Run(denoiser, sigmas, generator, callback)
    history: list[tuple[Tensor, float]] = []      # (x0 estimate, h of its step), newest first
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        if sigma_next == 0:
            x = denoised
            continue
        # In λ = −log σ with h = λ' − λ and h_η = (1 + η)h: keep e^{−h_η} of x, move 1 − e^{−h_η} toward x0, then
        # add the Taylor terms of x0(λ) (first and second divided differences over the last three estimates)
        # weighted by φ_2(h_η) = 1 − (1 − e^{−h_η})/h_η and φ_3 = φ_2/h_η − 1/2 (the exponential integrator's
        # φ functions, DPM-Solver++ eq. 8 with the SDE's doubled rate), and fresh noise of size
        # σ'·sqrt(1 − e^{−2ηh}).
        h = math.log(sigma / sigma_next)
        h_eta = h * (1.0 + eta)
        x = x * math.exp(-h_eta) - denoised * math.expm1(-h_eta)
        phi_2 = math.expm1(-h_eta) / h_eta + 1.0
        if len(history) >= 2:
            (d_1, h_1), (d_2, h_2) = history[:2]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
        elif history:
            d_1, h_1 = history[0]
            x = x + (denoised - d_1) * (h / h_1 * phi_2)
        if eta > 0:
            x = x + run.noise(x) * (sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)))
        history = [(denoised, h), *history[:1]]
    return x
