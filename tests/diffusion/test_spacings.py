"""The community step spacings: LCM's grid against LCMScheduler, simple / sgm_uniform / beta against their
definitions (ComfyUI's comfy/samplers.py), the beta quantile against scipy, Align Your Steps' published tables."""

import math

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from ldm.schedules import (AYS_SIGMAS, FEW_STEP_SPACINGS, LCM_ORIGINAL_STEPS, NoiseSchedule, ScheduleConfig,
                           beta_cdf, beta_quantile, spacing_for_family)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
S = NoiseSchedule()


@pytest.mark.parametrize("cls", [LCMScheduler, TCDScheduler])
def test_lcm_grid_matches_diffusers(cls):
    ref = cls(**SD)
    for steps in range(1, LCM_ORIGINAL_STEPS + 1):
        ref.set_timesteps(steps)
        sigmas = S.sigmas_for(steps, "lcm")
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert torch.equal(sigmas[:-1], S.sigmas[ref.timesteps]), steps
    with pytest.raises(ValueError, match="lcm spacing has at most 50 steps.*steps=51"):
        S.sigmas_for(51, "lcm")


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 20, 30])
def test_simple(steps):
    # ComfyUI's simple_scheduler: sigs[-(1 + int(x * len(sigs) / steps))] for x in range(steps), then 0.
    table = S.sigmas.tolist()
    ref = [table[-(1 + int(x * (len(table) / steps)))] for x in range(steps)] + [0.0]
    assert S.sigmas_for(steps, "simple").tolist() == ref


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_sgm_uniform(steps):
    sigmas = S.sigmas_for(steps, "sgm_uniform")
    t = S.sigma_to_t(sigmas[:-1])
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0 and math.isclose(sigmas[0], S.sigma_max)
    # timesteps evenly spaced from 999 down, the 0 end left out: t_i = 999·(1 − i/steps)
    assert torch.allclose(t, 999 * (1 - torch.arange(steps, dtype=torch.float64) / steps), atol=1e-9)


def test_beta_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((0.6, 0.6), (0.5, 2.0), (3.0, 1.5)):
        for p in np.linspace(0, 1, 41):
            assert math.isclose(beta_quantile(p, a, b), stats.beta.ppf(p, a, b), abs_tol=1e-12), (a, b, p)
        for x in np.linspace(0.01, 0.99, 17):
            assert math.isclose(beta_cdf(x, a, b), stats.beta.cdf(x, a, b), rel_tol=1e-12, abs_tol=1e-14)
    with pytest.raises(ValueError, match="p must be in"):
        beta_quantile(1.5, 0.6, 0.6)


@pytest.mark.parametrize("steps", [1, 4, 10, 20, 40])
def test_beta(steps):
    stats = pytest.importorskip("scipy.stats")
    # ComfyUI's beta_scheduler: t = rint(ppf(1 − i/steps)·999), repeated timesteps dropped.
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    assert S.sigmas_for(steps, "beta").tolist() == S.sigmas[kept].tolist() + [0.0]


@pytest.mark.parametrize("name", ["ays", "ays_sdxl"])
def test_align_your_steps(name):
    table = torch.tensor(AYS_SIGMAS[name], dtype=torch.float64)
    ten = S.sigmas_for(10, name)
    # 10 steps are the published levels, the last (σ_min) replaced by the final 0
    assert torch.equal(ten[:-1], table[:-1]) and ten[-1] == 0
    assert math.isclose(table[-1], S.sigma_min, rel_tol=1e-8) and math.isclose(table[0], S.sigma_max, rel_tol=1e-8)
    for steps in (1, 4, 7, 25):
        s = S.sigmas_for(steps, name)
        assert s.shape == (steps + 1,) and (s[:-1].diff() < 0).all() and math.isclose(s[0], table[0])
        # ComfyUI's loglinear_interp: np.interp of log σ (ascending) over [0, 1], steps + 1 points, reversed
        ascending = np.log(table.numpy()[::-1])
        ref = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, 11), ascending))[::-1]
        assert np.allclose(s[:-1].numpy(), ref[:-1], rtol=1e-12)
    # the final level σ_min (DDIM's ᾱ_0) is the table's own last value
    assert math.isclose(S.sigmas_for(10, name, final="alpha0")[-1], S.sigma_min)


def test_ays_follows_the_family():
    assert spacing_for_family("ays", "sdxl") == "ays_sdxl" and spacing_for_family("ays", "sd15") == "ays"
    assert spacing_for_family("karras", "sdxl") == "karras" and spacing_for_family(None, "sdxl") is None


@pytest.mark.parametrize("spacing", FEW_STEP_SPACINGS)
def test_every_spacing_is_a_valid_sigma_list(spacing):
    from ldm.samplers import check_sigmas
    for steps in (1, 2, 9, 30):
        s = S.sigmas_for(steps, spacing)
        check_sigmas(s)
        assert len(s) <= steps + 1 and s[-1] == 0 and s[0] <= S.sigma_max * (1 + 1e-9)
    zero_snr = NoiseSchedule(ScheduleConfig(rescale_betas_zero_snr=True))
    check_sigmas(zero_snr.sigmas_for(4, spacing))
