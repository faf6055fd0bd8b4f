"""The Denoiser wrapper: ε/v/x0 conversions, input scaling, timestep quantisation, dtypes, NaN reporting;
and ldm.rng's per-image generators."""

import pytest
import torch
from gaussian import GaussianMixture

from ldm.denoiser import Denoiser
from ldm.rng import generators_for, randn
from ldm.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule()
DATA = GaussianMixture.gaussian([0.7, -0.2], [0.5, 1.5])


class Recorder:
    """A network that records what it was called with and returns a fixed function of its input."""

    def __init__(self, fn=lambda x, t: 0.1 * x + 0.001 * t.reshape(-1, *([1] * (x.ndim - 1)))):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, **cond):
        self.calls.append((x_t, t, cond))
        return self.fn(x_t, t)


def test_exact_eps_network_gives_the_exact_denoiser():
    x = 5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.05, 1.3, 14.0):
        d = Denoiser(DATA.eps_model(SCHEDULE), SCHEDULE, "epsilon", quantize=False)
        assert torch.allclose(d(x, sigma), DATA.denoise(x, sigma), atol=1e-8)


def test_input_scaling_timestep_and_conversions():
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([14.6, 2.0, 0.1])
    net = Recorder()
    x_t_expected = x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1)
    for kind in ("epsilon", "v_prediction", "sample"):
        out = Denoiser(net, SCHEDULE, kind)(x, sigma)
        x_t, t, _ = net.calls[-1]
        assert torch.allclose(x_t, x_t_expected)
        assert torch.equal(t, SCHEDULE.sigma_to_t(sigma).round().float())  # integer t by default
        o = net.fn(x_t, t)
        s = sigma.reshape(-1, 1, 1, 1)
        expected = {"epsilon": x - s * o,
                    "v_prediction": x / (s**2 + 1) - s / (s**2 + 1).sqrt() * o,
                    "sample": o}[kind]
        assert torch.allclose(out, expected, atol=1e-6)
    Denoiser(net, SCHEDULE, quantize=False)(x, sigma)
    assert not torch.equal(net.calls[-1][1], net.calls[-1][1].round())


def test_scalar_and_batch_sigma_agree_and_bad_shapes_fail():
    x = torch.randn(3, 4, 2, 2)
    d = Denoiser(Recorder(), SCHEDULE)
    assert torch.equal(d(x, 2.0), d(x, torch.full((3,), 2.0)))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(3,\), got \(2,\)"):
        d(x, torch.ones(2))
    with pytest.raises(ValueError, match="model output has shape"):
        Denoiser(lambda x_t, t: x_t[:1], SCHEDULE)(x, 1.0)
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        Denoiser(Recorder(), SCHEDULE, "x0")


def test_network_dtype_casting():
    x = torch.randn(2, 4, 2, 2)
    context = torch.randn(2, 3, 8)
    ids = torch.tensor([1, 2])
    net = Recorder(lambda x_t, t: x_t * 0.5)
    out = Denoiser(net, SCHEDULE, dtype=torch.bfloat16)(x, 1.0, context=context, ids=ids)
    x_t, _, cond = net.calls[-1]
    assert x_t.dtype == torch.bfloat16 and cond["context"].dtype == torch.bfloat16
    assert cond["ids"].dtype == torch.int64  # integer conditions are left alone
    assert out.dtype == torch.float32


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_output_raises(bad, kind):
    net = Recorder(lambda x_t, t: torch.full_like(x_t, bad))
    with pytest.raises(FloatingPointError, match=f"model output contains {kind} at sigma=\\[3.0, 3.0\\]"):
        Denoiser(net, SCHEDULE)(torch.zeros(2, 4), 3.0)


def test_rng_per_row_generators():
    shape = (3, 4, 5, 5)
    rows = randn(shape, generators_for([5, 6, 7]))
    assert torch.equal(rows[1:2], randn((1, 4, 5, 5), generators_for([6])))
    # a single generator draws the whole shape at once (as diffusers' randn_tensor)
    assert torch.equal(randn(shape, torch.Generator().manual_seed(5)),
                       torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(randn(shape, generators_for([5])), randn(shape, torch.Generator().manual_seed(5)))
    assert randn(shape, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="got 2 generators for a batch of shape"):
        randn(shape, generators_for([1, 2]))
    with pytest.raises(ValueError, match="outside"):
        generators_for([-1])
    with pytest.raises(ValueError, match="integers"):
        generators_for(["7"])
