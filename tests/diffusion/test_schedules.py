"""Noise schedules: β tables and timestep spacings against diffusers, σ ↔ t, forward process moments."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm.schedules import NoiseSchedule, ScheduleConfig, make_betas, rescale_zero_terminal_snr

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("kind,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                            ("squaredcos_cap_v2", 1e-4, 0.02)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(kind, start, end, zero_snr):
    ours = NoiseSchedule(ScheduleConfig(beta_schedule=kind, beta_start=start, beta_end=end,
                                        rescale_betas_zero_snr=zero_snr))
    ref = DDIMScheduler(beta_schedule=kind, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.double(), atol=2e-6, rtol=0)
    assert ours.alphas_cumprod.dtype == torch.float64


def test_cosine_alias_and_unknown_kind():
    assert torch.equal(make_betas("cosine", 50), make_betas("squaredcos_cap_v2", 50))
    assert ScheduleConfig(beta_schedule="cosine").beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        make_betas("quadratic")


def test_zero_terminal_snr():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    ab_old, ab_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert ab_new[-1] == 0 and math.isclose(ab_new[0], ab_old[0], rel_tol=1e-12)
    s = NoiseSchedule(ScheduleConfig(rescale_betas_zero_snr=True))
    # σ_max is clamped (ᾱ = 2^-24, diffusers' choice) rather than infinite.
    assert math.isfinite(s.sigma_max) and abs(s.sigma_max - 4096) < 1
    assert torch.isfinite(s.log_sigmas).all()
    assert abs(s.sigma_to_t(s.sigma_max) - 999) < 1e-12 and s.sigma_to_t(float("inf")) == 999


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    s = NoiseSchedule(ScheduleConfig(steps_offset=offset, timestep_spacing=spacing))
    # (diffusers' float np.arange makes "trailing" emit an extra timestep -1 for some counts, e.g. 998.)
    for steps in (1, 3, 7, 20, 30, 50, 333, 997):
        for cls, convention in ((DDIMScheduler, "ddim"), (DDPMScheduler, "ddim"),
                                (DPMSolverMultistepScheduler, "dpmsolver")):
            ref = cls(steps_offset=offset, timestep_spacing=spacing, **SD)
            ref.set_timesteps(steps)
            assert torch.equal(s.timesteps(steps, convention=convention), ref.timesteps), (cls, steps)


def test_leading_offset_past_the_end_is_an_error():
    s = NoiseSchedule(ScheduleConfig(steps_offset=1))
    with pytest.raises(ValueError, match="outside"):
        s.timesteps(1000, "leading")


def test_sigma_t_round_trip():
    s = NoiseSchedule()
    t = torch.linspace(0, 999, 1777, dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-9)
    ints = torch.arange(1000)
    assert torch.allclose(s.t_to_sigma(ints), s.sigmas, rtol=1e-12)
    sig = torch.exp(torch.linspace(math.log(s.sigma_min), math.log(s.sigma_max), 500, dtype=torch.float64))
    assert torch.allclose(s.t_to_sigma(s.sigma_to_t(sig)), sig, rtol=1e-10)
    # σ = sqrt((1 − ᾱ)/ᾱ) exactly at integer t
    assert torch.allclose(s.sigmas**2, (1 - s.alphas_cumprod) / s.alphas_cumprod, rtol=1e-12)
    # out of range clamps
    assert s.sigma_to_t(1e-6) == 0 and s.sigma_to_t(1e6) == 999


def test_sigmas_for_discrete_and_final():
    s = NoiseSchedule()
    sig = s.sigmas_for(50, "leading")
    assert sig.shape == (51,) and sig[-1] == 0
    assert torch.equal(sig[:-1], s.sigmas[s.timesteps(50, "leading")])
    alpha0 = s.sigmas_for(50, "leading", final="alpha0")
    assert alpha0[-1] == s.sigmas[0] and torch.equal(alpha0[:-1], sig[:-1])
    # steps_offset=0 already ends at t=0: nothing left to step to
    s0 = NoiseSchedule(ScheduleConfig(steps_offset=0))
    assert s0.sigmas_for(10, "leading", final="alpha0").shape == (10,)
    with pytest.raises(ValueError, match="alpha0"):
        s.sigmas_for(10, "karras", final="alpha0")


@pytest.mark.parametrize("steps", [1, 5, 25])
def test_karras_and_exponential(steps):
    s = NoiseSchedule()
    k = s.sigmas_for(steps, "karras")
    assert k.shape == (steps + 1,) and k[-1] == 0 and math.isclose(k[0], s.sigma_max)
    assert (k[:-1].diff() < 0).all()
    ref = DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD)
    ref.set_timesteps(steps)
    assert torch.allclose(k.float(), ref.sigmas, rtol=1e-4)  # diffusers builds ᾱ in float32
    e = s.sigmas_for(steps, "exponential")
    if steps > 1:
        assert math.isclose(e[steps - 1], s.sigma_min, rel_tol=1e-12)
        assert torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(steps - 1), atol=1e-9)


def test_bad_steps_and_spacing():
    s = NoiseSchedule()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            s.sigmas_for(bad, "karras")
    with pytest.raises(ValueError, match="spacing 'cubic'"):
        s.sigmas_for(10, "cubic")
    with pytest.raises(ValueError, match="ScheduleConfig.prediction_type='eps'"):
        ScheduleConfig(prediction_type="eps")


def test_config_dict_round_trip_with_diffusers():
    d = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
         "steps_offset": 1, "trained_betas": None, "clip_sample": False, "prediction_type": "v_prediction"}
    cfg = ScheduleConfig.from_dict(d)
    assert cfg.prediction_type == "v_prediction" and cfg.steps_offset == 1
    ddim = DDIMScheduler(**cfg.to_dict())
    assert ddim.config.prediction_type == "v_prediction" and not ddim.config.clip_sample
    assert ScheduleConfig.from_dict(dict(ddim.config)) == cfg


def test_markov_chain_matches_closed_form():
    """Iterating q(x_t | x_{t−1}) from x0 reproduces the moments of q(x_t | x_0)."""
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 1.5, dtype=torch.float64)
    x = x0
    for t in range(300):
        x = s.q_step(x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
        if t in (0, 49, 299):
            ab = s.alphas_cumprod[t]
            closed = s.q_sample(x0, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
            for sample in (x, closed):
                assert abs(sample.mean() - ab.sqrt() * 1.5) < 0.03
                assert abs(sample.var() / (1 - ab) - 1) < 0.05


def test_q_sample_per_row_timesteps_and_bad_t():
    s = NoiseSchedule()
    x0, n = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    out = s.q_sample(x0, torch.tensor([0, 10, 999]), n)
    assert torch.allclose(out[:, 0, 0], s.alphas_cumprod[[0, 10, 999]].sqrt().float())
    with pytest.raises(ValueError, match="outside"):
        s.q_sample(x0, 1000, n)
    with pytest.raises(ValueError, match="integer timesteps"):
        s.q_sample(x0, 1.5, n)
