"""Few-step samplers for consistency-distilled models: LCM (LCM-LoRA, LCM U-Nets) and TCD.

Both read a discrete timestep off the model's noise schedule: LCM's boundary condition is a function of the
integer timestep the model was distilled on, and TCD's intermediate point is a timestep below the next one.
The schedule arrives as an option (``schedule=``; the pipeline passes its model's, the default is Stable
Diffusion's), so the samplers stay pure functions of (denoiser, x, sigmas). The σ grid itself is the
``"lcm"`` spacing (``ldm.schedules``), which the samplers name as their default through ``schedule_hints``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.samplers.base import Run, schedule_hints
from ldm.schedules import NoiseSchedule

# LCMScheduler's boundary condition constants (Song et al. 2023, "Consistency Models", §3 and Appendix C;
# Luo et al. 2023 take σ_data = 0.5 and scale the timestep by 10 so c_skip(t) falls to ~0 within a few steps).
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def _timestep(schedule: NoiseSchedule, sigma: float) -> int:
    """The integer timestep whose σ is `sigma` (the nearest one off the grid, as the denoiser rounds)."""
    return int(round(float(schedule.sigma_to_t(sigma))))


def boundary_scalings(t: float) -> tuple[float, float]:
    """c_skip(t), c_out(t) of the consistency function f(x, t) = c_skip·x + c_out·F(x, t), with c_skip(0) = 1 and
    c_out(0) = 0 so that f is the identity at the boundary (Song et al. 2023, eq. 5), at the scaled time t·10."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)


@schedule_hints(spacing="lcm")
@torch.no_grad()
def lcm(denoiser, x, sigmas, *, generator=None, callback=None, schedule: NoiseSchedule | None = None) -> Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3)."""
    run = Run(denoiser, sigmas, generator, callback)
    schedule = schedule or NoiseSchedule()
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        # The boundary condition mixes in the VP sample x_vp = x/sqrt(1 + σ²) the network saw; it is what keeps
        # f(x, 0) = x, and it is negligible (c_skip < 1e-5) above the first few timesteps.
        c_skip, c_out = boundary_scalings(_timestep(schedule, sigma))
        x0 = denoised * c_out + x * (c_skip / math.sqrt(1.0 + sigma * sigma))
        # Consistency models jump to x0 and re-noise it to the next level with fresh noise (none at σ = 0).
        x = x0 + run.noise(x) * sigma_next if sigma_next > 0 else x0
    return x


def tcd_level(schedule: NoiseSchedule, sigma_next: float, gamma: float) -> float:
    """σ at s = ⌊(1 − γ)·t'⌋ for the next level's timestep t' (TCD's intermediate point; σ' itself at γ = 0)."""
    if gamma == 0 or sigma_next == 0:
        return sigma_next
    s = math.floor((1.0 - gamma) * _timestep(schedule, sigma_next))
    return min(sigma_next, float(schedule.sigmas[s]))


@schedule_hints(spacing="lcm", final="alpha0")
@torch.no_grad()
def tcd(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 0.0,
        schedule: NoiseSchedule | None = None) -> Tensor:
    """Strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency Distillation"); eta is its γ."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"tcd: eta (TCD's gamma) must be in [0, 1], got {eta}")
    run = Run(denoiser, sigmas, generator, callback)
    schedule = schedule or NoiseSchedule()
    for i, sigma, sigma_next in run:
        denoised = run.denoise(i, x)
        # Follow the predicted trajectory (the DDIM direction ε = (x − x0)/σ) down to s ≤ t', below the next level,
        # then diffuse forward from s to t' with fresh noise: x' = x_s + sqrt(σ'² − σ_s²)·z.  γ = 0 is DDIM.
        sigma_s = tcd_level(schedule, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_s / sigma)
        if sigma_next > sigma_s:
            x = x + run.noise(x) * math.sqrt(sigma_next**2 - sigma_s**2)
    return x
