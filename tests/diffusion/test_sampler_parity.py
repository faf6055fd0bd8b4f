"""Parity with diffusers' schedulers: the same ε-network, timesteps and generator give the same trajectory.

diffusers' DDPM/DDIM/DPM-Solver schedulers work in VP space (x_VP = x / sqrt(1 + σ²)) and start from
latents · init_noise_sigma (= latents); ldm works in σ-space and starts from latents · sqrt(1 + σ_0²).
Euler schedulers work in σ-space as ldm does.
"""

import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from torch import nn

from ldm.denoiser import Denoiser
from ldm.samplers import SAMPLERS
from ldm.schedules import NoiseSchedule, ScheduleConfig

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("single_thread")


class TinyEps(nn.Module):
    """A smooth, t-dependent ε-network: the exact ε for N(0, I) data, sqrt(1 − ᾱ_t)·x_t, plus a random conv net."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        torch.manual_seed(0)
        self.schedule = schedule
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.time = nn.Linear(16, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x_t, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
        h = nn.functional.silu(self.conv_in(x_t) + self.time(emb)[:, :, None, None])
        sigma = self.schedule.t_to_sigma(t).float()
        base = (sigma / (1 + sigma**2).sqrt()).reshape(-1, 1, 1, 1) * x_t
        return base + 0.3 * torch.tanh(self.conv_out(h))


def latents(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def diffusers_run(scheduler, model, steps, seed=None, **step_kwargs):
    """diffusers' denoising loop; returns the final sample and the sample before each step."""
    scheduler.set_timesteps(steps)
    x = latents() * scheduler.init_noise_sigma
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            trajectory.append(x)
            eps = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x, trajectory


def ldm_run(name, model, schedule, sigmas, seed=None, vp=True, **options):
    """ldm's sampler on the same network and initial noise; samples converted to diffusers' space.

    vp=True: diffusers' VP schedulers (start from latents; ldm from latents · sqrt(1 + σ_0²)).
    vp=False: diffusers' Euler schedulers, already in σ-space, which start from latents · sqrt(1 + σ_0²) with
    "leading" spacing.
    """
    sigmas = sigmas.to(torch.float64)
    to_theirs = (lambda x, s: x / math.sqrt(1 + s**2)) if vp else (lambda x, s: x)
    x = latents() * math.sqrt(1 + sigmas[0] ** 2)
    trajectory = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = SAMPLERS[name](Denoiser(model, schedule), x, sigmas, generator=generator,
                         callback=lambda info: trajectory.append(to_theirs(info["x"], info["sigma"])), **options)
    return to_theirs(out, float(sigmas[-1])), trajectory


def assert_same(ours, theirs):
    (x, traj), (x_ref, traj_ref) = ours, theirs
    assert len(traj) == len(traj_ref)
    for i, (a, b) in enumerate(zip(traj, traj_ref)):
        assert torch.allclose(a, b, atol=ATOL, rtol=0), f"step {i}: max diff {(a - b).abs().max():.2e}"
    assert torch.allclose(x, x_ref, atol=ATOL, rtol=0), f"final: max diff {(x - x_ref).abs().max():.2e}"
    assert x.abs().max() > 0.1  # not a trivially vanishing sample


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddpm(steps, offset):
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=offset))
    model = TinyEps(schedule)
    ref = DDPMScheduler(clip_sample=False, variance_type="fixed_small", steps_offset=offset, **SD)
    assert_same(ldm_run("ddpm", model, schedule, schedule.sigmas_for(steps, "leading"), seed=7),
                diffusers_run(ref, model, steps, seed=7))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 30])
def test_ddim_sd_config(eta, steps):
    schedule = NoiseSchedule(ScheduleConfig())  # SD: leading, steps_offset=1, set_alpha_to_one=False
    model = TinyEps(schedule)
    ref = DDIMScheduler(**schedule.config.to_dict())
    sigmas = schedule.sigmas_for(steps, "leading", final="alpha0")
    assert_same(ldm_run("ddim", model, schedule, sigmas, seed=3, eta=eta),
                diffusers_run(ref, model, steps, seed=3, eta=eta))


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmsolver_pp_2m(karras, steps):
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras,
                                      **SD)
    sigmas = schedule.sigmas_for(steps, "karras" if karras else "linspace", convention="dpmsolver")
    assert_same(ldm_run("dpmpp_2m", model, schedule, sigmas), diffusers_run(ref, model, steps))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmsolver_pp_2m_sde(karras):
    schedule = NoiseSchedule(ScheduleConfig(steps_offset=0))
    model = TinyEps(schedule)
    ref = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=karras,
                                      **SD)
    sigmas = schedule.sigmas_for(20, "karras" if karras else "linspace", convention="dpmsolver")
    assert_same(ldm_run("dpmpp_2m_sde", model, schedule, sigmas, seed=5), diffusers_run(ref, model, 20, seed=5))


@pytest.mark.parametrize("name,cls", [("euler", EulerDiscreteScheduler), ("euler_a", EulerAncestralDiscreteScheduler)])
def test_euler_schedulers(name, cls):
    schedule = NoiseSchedule(ScheduleConfig())
    model = TinyEps(schedule)
    ref = cls(timestep_spacing="leading", steps_offset=1, **SD)
    sigmas = schedule.sigmas_for(15, "leading")
    assert_same(ldm_run(name, model, schedule, sigmas, seed=11, vp=False), diffusers_run(ref, model, 15, seed=11))
