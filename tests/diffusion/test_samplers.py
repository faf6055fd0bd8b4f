"""Samplers on analytic Gaussian data: moments, convergence order, identities, reproducibility, bad input."""

import pytest
import torch
from gaussian import GaussianMixture

from ldm.denoiser import Denoiser
from ldm.rng import generators_for
from ldm.samplers import SAMPLERS, check_sigmas, get_sampler
from ldm.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule()
pytestmark = pytest.mark.usefixtures("single_thread")
DATA = GaussianMixture.gaussian([1.0, -0.5, 0.3], [0.5, 1.0, 2.0])
MU, STD = DATA.means[0], DATA.stds[0]

# (sampler, options, steps, mean tolerance / s, variance tolerance (relative)).  Deterministic samplers start
# from whitened noise (sample mean exactly 0, covariance exactly I), so their only error is discretisation;
# stochastic ones also carry the sampling error of 4000 draws (≈ 2.2 % on a variance).  First-order samplers
# need more steps than second-order ones; ancestral first-order samplers the most.
CASES = [
    ("euler", {}, 100, 0.01, 0.05),
    ("ddim", {}, 100, 0.01, 0.05),
    ("heun", {}, 25, 0.01, 0.03),
    ("dpm_2", {}, 25, 0.01, 0.03),
    ("dpmpp_2m", {}, 25, 0.01, 0.03),
    ("ddpm", {}, 250, 0.06, 0.08),
    ("euler_a", {}, 250, 0.06, 0.08),
    ("ddim", {"eta": 1.0}, 250, 0.06, 0.08),
    ("dpmpp_2m_sde", {}, 50, 0.06, 0.08),
    ("lms", {}, 25, 0.01, 0.03),
    ("unipc", {}, 25, 0.01, 0.03),
    ("tcd", {}, 100, 0.01, 0.05),               # γ = 0: DDIM
    ("dpmpp_2s_a", {}, 100, 0.06, 0.08),
    ("dpmpp_sde", {}, 50, 0.06, 0.08),
    ("dpmpp_3m_sde", {}, 50, 0.06, 0.08),
]
# lcm is a consistency sampler: it needs a consistency-distilled model, and the exact posterior mean is not one
# (each step's jump to E[x0 | x] shrinks the spread); its parity with LCMScheduler is in test_sampler_parity_more.
NOT_FOR_EXACT_DENOISERS = {"lcm"}


def whitened_noise(n, dim, seed=0):
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T


def start(sigmas, n=4000):
    """Draws from the exact noisy marginal at sigmas[0], so only the sampler's own error remains."""
    return (MU + whitened_noise(n, 3) * (STD**2 + sigmas[0] ** 2).sqrt()).float()


def test_registry_names():
    assert {"ddpm", "ddim", "euler", "euler_a", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde"} <= set(SAMPLERS)
    assert {name for name, *_ in CASES} == set(SAMPLERS) - NOT_FOR_EXACT_DENOISERS


@pytest.mark.parametrize("name,options,steps,mean_tol,var_tol", CASES)
def test_moments_match_gaussian_data(name, options, steps, mean_tol, var_tol):
    sigmas = SCHEDULE.sigmas_for(steps, "karras")
    out = SAMPLERS[name](DATA.denoise, start(sigmas), sigmas, generator=torch.Generator().manual_seed(1),
                         **options).double()
    assert ((out.mean(0) - MU).abs() / STD).max() < mean_tol
    assert (out.var(0) / STD**2 - 1).abs().max() < var_tol
    off_diagonal = torch.corrcoef(out.T) - torch.eye(3, dtype=torch.float64)
    assert off_diagonal.abs().max() < 0.06


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(name, order):
    """Per-sample error against the exact probability-flow solution shrinks like steps^-order."""
    x = 15 * torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40):
        sigmas = SCHEDULE.sigmas_for(steps, "karras")
        out = SAMPLERS[name](DATA.denoise, x, sigmas)
        errors.append((out - DATA.flow_map(x, float(sigmas[0]))).abs().max())
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.5**order * 0.75 < fine / coarse < 0.5**order * 1.25
    assert errors[-1] < (0.25 if order == 1 else 0.02)


def test_ddim_eta0_equals_euler():
    sigmas = SCHEDULE.sigmas_for(30, "leading", final="alpha0")
    x = start(sigmas, 512)
    assert torch.allclose(SAMPLERS["ddim"](DATA.denoise, x, sigmas), SAMPLERS["euler"](DATA.denoise, x, sigmas),
                          atol=1e-5, rtol=0)


def test_ddpm_equals_ddim_eta1():
    """The DDPM posterior is DDIM with η = 1 (Song et al. 2021, §4.1); same noise, same result."""
    sigmas = SCHEDULE.sigmas_for(20, "trailing")
    x = start(sigmas, 512)
    a = SAMPLERS["ddpm"](DATA.denoise, x, sigmas, generator=torch.Generator().manual_seed(3))
    b = SAMPLERS["ddim"](DATA.denoise, x, sigmas, generator=torch.Generator().manual_seed(3), eta=1.0)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpmpp_2m_sde", "lcm", "dpmpp_2s_a", "dpmpp_sde",
                                  "dpmpp_3m_sde"])
def test_per_row_generators_make_rows_independent_of_batch(name):
    sigmas = SCHEDULE.sigmas_for(8, "karras")
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    batch = SAMPLERS[name](DATA.denoise, x, sigmas, generator=generators_for([10, 11, 12]))
    alone = SAMPLERS[name](DATA.denoise, x[1:2], sigmas, generator=generators_for([11]))
    assert torch.allclose(batch[1:2], alone, atol=1e-6)
    again = SAMPLERS[name](DATA.denoise, x, sigmas, generator=generators_for([10, 11, 12]))
    assert torch.equal(batch, again)
    other = SAMPLERS[name](DATA.denoise, x, sigmas, generator=generators_for([10, 99, 12]))
    assert torch.equal(batch[0], other[0]) and not torch.allclose(batch[1], other[1])


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.sigmas = fn, 0, []

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma)


@pytest.mark.parametrize("name,evaluations", [("euler", 6), ("ddpm", 6), ("heun", 11), ("dpm_2", 11),
                                              ("dpmpp_2m", 6), ("dpmpp_2m_sde", 6), ("lms", 6), ("unipc", 6),
                                              ("dpmpp_3m_sde", 6), ("dpmpp_2s_a", 11), ("dpmpp_sde", 11),
                                              ("lcm", 6), ("tcd", 6)])
def test_callback_and_evaluation_count(name, evaluations):
    sigmas = SCHEDULE.sigmas_for(6, "karras")
    model, seen = Counting(DATA.denoise), []
    x = start(sigmas, 16)
    SAMPLERS[name](model, x, sigmas, callback=seen.append)
    assert model.calls == evaluations  # 2nd-order single-step samplers: 2 per step, 1 on the last (to σ = 0)
    assert [info["i"] for info in seen] == list(range(6))
    assert seen[0]["x"] is x and seen[0]["sigma"] == float(sigmas[0]) and seen[-1]["sigma_next"] == 0
    assert all(info["steps"] == 6 and info["denoised"].shape == x.shape for info in seen)
    assert 0.0 not in model.sigmas  # the denoiser is never asked about σ = 0


def test_final_alpha0_stops_at_that_sigma():
    sigmas = SCHEDULE.sigmas_for(100, "leading", final="alpha0")
    x = 15 * torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = SAMPLERS["dpmpp_2m"](DATA.denoise, x, sigmas)
    exact = DATA.flow_map(x, float(sigmas[0]), float(sigmas[-1]))
    assert sigmas[-1] == SCHEDULE.sigma_min and (out - exact).abs().max() < 0.04


def test_samplers_work_through_the_denoiser_wrapper():
    """The exact denoiser as a VP ε-network, wrapped by Denoiser, samples the data in float32."""
    denoiser = Denoiser(DATA.eps_model(SCHEDULE), SCHEDULE, "epsilon", quantize=False)
    sigmas = SCHEDULE.sigmas_for(25, "karras")
    out = SAMPLERS["dpmpp_2m"](denoiser, start(sigmas), sigmas).double()
    assert ((out.mean(0) - MU).abs() / STD).max() < 0.01
    assert (out.var(0) / STD**2 - 1).abs().max() < 0.03


@pytest.mark.parametrize("bad,message", [
    ([14.6, 3.0, 3.0, 0.0], r"strictly decreasing: sigmas\[2\] = 3 >= sigmas\[1\] = 3 \(first bad index 2\)"),
    ([1.0, 2.0, 0.0], r"first bad index 1"),
    ([[1.0, 0.0]], "must be 1-D"),
    ([1.0], r"at least 2 entries \(steps >= 1\)"),
    ([], r"at least 2 entries"),
    ([2.0, float("nan"), 0.0], r"finite and >= 0: sigmas\[1\] = nan"),
    ([2.0, 1.0, -0.5], r"sigmas\[2\] = -0.5"),
])
def test_bad_sigmas(bad, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(bad)
    for name in SAMPLERS:
        with pytest.raises(ValueError, match=message):
            SAMPLERS[name](DATA.denoise, torch.zeros(2, 3), bad)


def test_unknown_sampler_lists_names():
    for lookup in (get_sampler, SAMPLERS.__getitem__):
        with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'; known samplers: ddim, ddpm, dpm_2"):
            lookup("dpm++")
    with pytest.raises(KeyError):
        SAMPLERS["nope"]
    assert get_sampler("euler") is SAMPLERS["euler"]


def test_nan_model_output_is_reported():
    def broken(x_t, t):
        out = torch.zeros_like(x_t)
        out[0, 0] = float("nan")
        return out

    denoiser = Denoiser(broken, SCHEDULE)
    sigmas = SCHEDULE.sigmas_for(5, "karras")
    with pytest.raises(FloatingPointError, match=r"model output contains NaN at sigma=\[14.6"):
        SAMPLERS["euler"](denoiser, torch.zeros(2, 3), sigmas)


def test_negative_eta_is_rejected():
    sigmas = SCHEDULE.sigmas_for(5, "karras")
    for name in ("ddim", "euler_a", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde"):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            SAMPLERS[name](DATA.denoise, torch.zeros(2, 3), sigmas, eta=-1.0)


def uneven_sigmas(steps=30):
    """Karras levels with every other one of the first half dropped: step sizes in log σ alternate, so the
    multistep ratio r = h_{i−1}/h_i is far from 1 (a swapped r or 1/r shows up)."""
    k = SCHEDULE.sigmas_for(steps, "karras")
    keep = [i for i in range(len(k)) if i >= steps // 2 or i % 3 != 1]
    return k[keep]


def test_multistep_on_uneven_steps():
    x = 15 * torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = uneven_sigmas()
    out = SAMPLERS["dpmpp_2m"](DATA.denoise, x, sigmas)
    assert (out - DATA.flow_map(x, float(sigmas[0]))).abs().max() < 0.03
    sde = SAMPLERS["dpmpp_2m_sde"](DATA.denoise, x, sigmas, eta=0.0)
    assert torch.allclose(sde, out, atol=1e-9, rtol=0)  # η = 0 removes the noise and leaves DPM-Solver++(2M)
