"""The newer samplers on analytic Gaussian data: convergence order of the ODE ones, identities between them, the
stochastic ones' moments against a deliberately wrong variant (the test must tell them apart), option checks."""

import pytest
import torch
from gaussian import GaussianMixture

from ldm.samplers import SAMPLERS, schedule_hints_of
from ldm.samplers.base import Run
from ldm.schedules import NoiseSchedule, ScheduleConfig

SCHEDULE = NoiseSchedule()
pytestmark = pytest.mark.usefixtures("single_thread")
DATA = GaussianMixture.gaussian([1.0, -0.5, 0.3], [0.5, 1.0, 2.0])
MU, STD = DATA.means[0], DATA.stds[0]


def flow_errors(name, steps_list, **options):
    x = 15 * torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in steps_list:
        sigmas = SCHEDULE.sigmas_for(steps, "karras")
        out = SAMPLERS[name](DATA.denoise, x, sigmas, **options)
        errors.append(float((out - DATA.flow_map(x, float(sigmas[0]))).abs().max()))
    return errors


@pytest.mark.parametrize("name,options,order,steps", [
    ("dpmpp_2s_a", {"eta": 0.0}, 2, (10, 20, 40)), ("dpmpp_sde", {"eta": 0.0}, 2, (10, 20, 40)),
    ("unipc", {}, 3, (10, 20, 40)), ("lms", {}, 3, (10, 20, 40)), ("dpmpp_3m_sde", {"eta": 0.0}, 3, (6, 12, 24))])
def test_ode_forms_converge_at_their_order(name, options, order, steps):
    """Error against the exact probability-flow map shrinks at least like steps^-order (UniPC-2 with its corrector
    and LMS-4 at third order or better; near 1e-3 the last jump from σ_min to 0 sets a floor)."""
    errors = flow_errors(name, steps, **options)
    for coarse, fine in zip(errors, errors[1:]):
        assert fine / coarse < 0.5**order * 1.25, errors
    assert errors[-1] < 0.01


def test_dpmpp_sde_and_2s_a_without_noise_are_dpm_solver_pp_2s():
    sigmas = SCHEDULE.sigmas_for(12, "karras")
    x = 15 * torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = SAMPLERS["dpmpp_sde"](DATA.denoise, x, sigmas, eta=0.0)
    b = SAMPLERS["dpmpp_2s_a"](DATA.denoise, x, sigmas, eta=0.0)
    assert torch.equal(a, b)


def test_tcd_without_gamma_is_ddim():
    sigmas = SCHEDULE.sigmas_for(8, "lcm", final="alpha0")
    x = 15 * torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(SAMPLERS["tcd"](DATA.denoise, x, sigmas), SAMPLERS["ddim"](DATA.denoise, x, sigmas),
                          atol=1e-12, rtol=0)


def moments_error(name, steps, n=4000, **options):
    sigmas = SCHEDULE.sigmas_for(steps, "karras")
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (MU + z * (STD**2 + sigmas[0] ** 2).sqrt()).float()
    out = SAMPLERS[name](DATA.denoise, x, sigmas, generator=torch.Generator().manual_seed(1), **options).double()
    return float(((out.mean(0) - MU).abs() / STD).max()), float((out.var(0) / STD**2 - 1).abs().max())


@pytest.mark.parametrize("name,steps", [("dpmpp_2s_a", 60), ("dpmpp_sde", 40), ("dpmpp_3m_sde", 40)])
def test_stochastic_moments_discriminate_a_wrong_step(name, steps, monkeypatch):
    """Right: the sample moments match the data's. Wrong (fresh noise 15 % too large, a plausible slip): they do not,
    under the same tolerance; so the moment test does check the step."""
    mean_error, var_error = moments_error(name, steps)
    assert mean_error < 0.06 and var_error < 0.08
    noise = Run.noise
    monkeypatch.setattr(Run, "noise", lambda self, x: 1.15 * noise(self, x))
    assert moments_error(name, steps)[1] > 0.12


def test_tcd_gamma_adds_noise_and_keeps_the_mean():
    sigmas = SCHEDULE.sigmas_for(50, "lcm", final="alpha0")
    x = (MU + torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         * (STD**2 + sigmas[0] ** 2).sqrt())
    a = SAMPLERS["tcd"](DATA.denoise, x, sigmas, eta=0.2, generator=torch.Generator().manual_seed(3))
    b = SAMPLERS["tcd"](DATA.denoise, x, sigmas, eta=0.2, generator=torch.Generator().manual_seed(4))
    # (each γ-step's long DDIM jump down to s = ⌊(1 − γ)t'⌋ is coarse for the exact denoiser: a loose spread check)
    assert not torch.allclose(a, b) and ((a.mean(0) - MU).abs() / STD).max() < 0.06
    assert ((a.var(0) / STD**2) - 1).abs().max() < 0.25


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_tcd_gamma_range(eta):
    with pytest.raises(ValueError, match=r"tcd: eta \(TCD's gamma\) must be in \[0, 1\]"):
        SAMPLERS["tcd"](DATA.denoise, torch.zeros(2, 3), SCHEDULE.sigmas_for(4, "lcm"), eta=eta)


def test_consistency_samplers_read_the_given_schedule():
    """LCM's boundary condition and TCD's intermediate timestep come from the schedule passed in."""
    sigmas = SCHEDULE.sigmas_for(4, "lcm")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 15
    other = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    for name, options in (("tcd", {"eta": 0.5}), ("lcm", {})):
        run = (lambda s: SAMPLERS[name](DATA.denoise, x, sigmas, generator=torch.Generator().manual_seed(0),
                                        schedule=s, **options))
        assert torch.equal(run(None), run(SCHEDULE)) and not torch.equal(run(None), run(other))


def test_schedule_hints():
    assert schedule_hints_of("lcm") == {"spacing": "lcm"}
    assert schedule_hints_of("tcd") == {"spacing": "lcm", "final": "alpha0"}
    assert schedule_hints_of("unipc") == {"convention": "dpmsolver"}
    assert schedule_hints_of("lms") == {"quantize": False}
    assert schedule_hints_of("euler") == {}
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        schedule_hints_of("nope")
