"""Parity of the newer samplers (lcm, tcd, unipc, lms, dpmpp_3m_sde) with diffusers' schedulers: the same ε-network,
timesteps and generator give the same trajectory (helpers and conventions: test_sampler_parity.py)."""

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, LCMScheduler, LMSDiscreteScheduler, TCDScheduler,
                       UniPCMultistepScheduler)
from test_sampler_parity import SD, TinyEps, latents

from ldm.denoiser import Denoiser
from ldm.samplers import SAMPLERS, schedule_hints_of
from ldm.samplers.consistency import boundary_scalings
from ldm.schedules import NoiseSchedule, ScheduleConfig

ATOL = 3e-5   # diffusers keeps its σ and coefficients in float32
pytestmark = pytest.mark.usefixtures("single_thread")


def diffusers_run(scheduler, model, steps=None, seed=None, timesteps=None, **step_kwargs):
    """diffusers' denoising loop (one generator for the whole run, if the scheduler draws noise); returns the final
    sample and the sample before each step."""
    scheduler.set_timesteps(steps, timesteps=timesteps) if timesteps else scheduler.set_timesteps(steps)
    x = latents() * scheduler.init_noise_sigma
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            trajectory.append(x)
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x, trajectory


def ldm_run(name, model, noise_schedule, sigmas, seed=None, vp=True, quantize=True, **options):
    """ldm's sampler from the same noise, its samples in diffusers' space (VP: x / sqrt(1 + σ²); σ-space: x)."""
    sigmas = sigmas.to(torch.float64)
    scale = (lambda s: (1 + s**2) ** -0.5) if vp else (lambda s: 1.0)
    x = latents() * (1 + sigmas[0] ** 2).sqrt()
    trajectory = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = SAMPLERS[name](Denoiser(model, noise_schedule, quantize=quantize), x, sigmas, generator=generator,
                         callback=lambda info: trajectory.append(info["x"] * scale(info["sigma"])), **options)
    return out * scale(float(sigmas[-1])), trajectory


def assert_same(ours, theirs, atol=ATOL):
    (x, traj), (x_ref, traj_ref) = ours, theirs
    assert len(traj) == len(traj_ref)
    for i, (a, b) in enumerate(zip(traj, traj_ref)):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {i}: max diff {(a - b).abs().max():.2e}"
    assert torch.allclose(x, x_ref, atol=atol, rtol=0), f"final: max diff {(x - x_ref).abs().max():.2e}"
    assert x.abs().max() > 0.1  # not a trivially vanishing sample


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm(steps):
    """LCMScheduler: its 50-step grid (the "lcm" spacing), the boundary condition, fresh noise between steps."""
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = LCMScheduler(clip_sample=False, **SD)
    sigmas = schedule.sigmas_for(steps, "lcm")
    ref.set_timesteps(steps)
    assert torch.equal(schedule.sigmas[ref.timesteps], sigmas[:-1])
    assert_same(ldm_run("lcm", model, schedule, sigmas, seed=4, schedule=schedule),
                diffusers_run(ref, model, steps, seed=4))


def test_lcm_boundary_condition_near_t0():
    """On timesteps down to 0 c_skip is no longer negligible (c_skip(0) = 1: the last step returns its input)."""
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = LCMScheduler(clip_sample=False, **SD)
    sigmas = torch.cat([schedule.sigmas[[59, 19, 0]], torch.zeros(1, dtype=torch.float64)])
    assert_same(ldm_run("lcm", model, schedule, sigmas, seed=2, schedule=schedule),
                diffusers_run(ref, model, seed=2, timesteps=[59, 19, 0]))
    assert boundary_scalings(0) == (1.0, 0.0) and boundary_scalings(999)[0] < 1e-8


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd(eta, steps):
    """TCDScheduler: eta is its gamma; the last step lands on ᾱ_0 (the "alpha0" final level)."""
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = TCDScheduler(clip_sample=False, **SD)
    hints = schedule_hints_of("tcd")
    sigmas = schedule.sigmas_for(steps, hints["spacing"], final=hints["final"])
    assert sigmas[-1] == schedule.sigma_min
    assert_same(ldm_run("tcd", model, schedule, sigmas, seed=6, eta=eta, schedule=schedule),
                diffusers_run(ref, model, steps, seed=6, eta=eta))


@pytest.mark.parametrize("spacing,offset,karras", [("linspace", 0, False), ("leading", 1, False),
                                                   ("trailing", 0, False), ("linspace", 0, True)])
@pytest.mark.parametrize("steps", [2, 5, 8, 20])
def test_unipc(spacing, offset, karras, steps):
    """UniPCMultistepScheduler (bh2, order 2, corrector on); its step layout is DPM-Solver's."""
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=offset))
    model = TinyEps(schedule)
    ref = UniPCMultistepScheduler(solver_order=2, solver_type="bh2", timestep_spacing=spacing, steps_offset=offset,
                                  use_karras_sigmas=karras, **SD)
    sigmas = schedule.sigmas_for(steps, "karras" if karras else spacing,
                                 convention=schedule_hints_of("unipc")["convention"])
    assert_same(ldm_run("unipc", model, schedule, sigmas), diffusers_run(ref, model, steps))


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_lms(steps):
    schedule = NoiseSchedule(ScheduleConfig())
    model = TinyEps(schedule)
    ref = LMSDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **SD)
    assert_same(ldm_run("lms", model, schedule, schedule.sigmas_for(steps, "leading"), vp=False),
                diffusers_run(ref, model, steps))


@pytest.mark.parametrize("steps", [10, 40])
def test_lms_karras_with_fractional_timesteps(steps):
    """LMSDiscreteScheduler feeds Karras levels' fractional timesteps; so does ldm where lms's hint says so."""
    schedule = NoiseSchedule(ScheduleConfig())
    model = TinyEps(schedule)
    ref = LMSDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="linspace", **SD)
    assert schedule_hints_of("lms")["quantize"] is False
    x_ref, trajectory_ref = diffusers_run(ref, model, steps)      # from latents · σ_max, in σ-space
    sigmas = schedule.sigmas_for(steps, "karras")
    trajectory = []
    x = SAMPLERS["lms"](Denoiser(model, schedule, quantize=False), latents() * float(sigmas[0]), sigmas,
                        callback=lambda info: trajectory.append(info["x"]))
    assert_same((x, trajectory), (x_ref, trajectory_ref), atol=1e-4)


def test_dpmpp_3m_sde_without_noise_is_dpm_solver_pp_3m():
    """η = 0 leaves DPM-Solver++(3M) (diffusers: solver_order=3 with the "heun" second-order warm-up step)."""
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun", **SD)
    sigmas = schedule.sigmas_for(20, "linspace", convention="dpmsolver")
    assert_same(ldm_run("dpmpp_3m_sde", model, schedule, sigmas, eta=0.0), diffusers_run(ref, model, 20))
