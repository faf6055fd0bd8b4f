"""Training targets, SNR, min-SNR-γ weights, offset noise and the loss."""

import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.losses import diffusion_loss, min_snr_weight, offset_noise, snr, training_target
from ldm.schedules import NoiseSchedule, ScheduleConfig

SCHEDULE = NoiseSchedule()


def example(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 6, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999][:batch])
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_network_denoises_exactly(prediction_type):
    """A network that outputs the training target recovers x0 through the Denoiser's conversion."""
    x0, noise, t = example()
    ab = SCHEDULE.alphas_cumprod[t]
    target = training_target(prediction_type, x0, noise, ab)
    x_t = SCHEDULE.q_sample(x0, t, noise)

    def perfect(x_in, t_in):
        assert torch.equal(t_in.double(), t.double())
        assert torch.allclose(x_in, x_t, atol=1e-10)  # the Denoiser's c_in maps x back to the VP sample
        return target

    sigma = SCHEDULE.sigmas[t]
    x = x_t * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)  # the same point in σ-space
    x0_hat = Denoiser(perfect, SCHEDULE, prediction_type)(x, sigma)
    assert torch.allclose(x0_hat, x0, atol=1e-8)
    assert diffusion_loss(target, x0, noise, ab, prediction_type) == 0


def test_v_target_formula():
    x0, noise, t = example()
    ab = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = training_target("v_prediction", x0, noise, SCHEDULE.alphas_cumprod[t])
    assert torch.allclose(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    assert torch.equal(training_target("epsilon", x0, noise, ab), noise)
    assert torch.equal(training_target("sample", x0, noise, ab), x0)


def test_snr_and_min_snr_weights():
    ab = torch.tensor([0.99, 0.5, 0.01, 0.0], dtype=torch.float64)
    s = snr(ab)
    assert torch.allclose(s, torch.tensor([99.0, 1.0, 1 / 99, 0.0], dtype=torch.float64))
    gamma = 5.0
    # Hang et al. 2023 as in diffusers' train_text_to_image.py: min(SNR, γ) divided by SNR (ε) or SNR + 1 (v)
    clipped = torch.stack([s, torch.full_like(s, gamma)], dim=1).min(dim=1).values
    eps = min_snr_weight(s, gamma, "epsilon")
    assert torch.allclose(eps[:3], clipped[:3] / s[:3]) and eps[3] == 1  # finite at zero terminal SNR
    assert torch.allclose(min_snr_weight(s, gamma, "v_prediction"), clipped / (s + 1))
    assert torch.allclose(min_snr_weight(s, gamma, "sample"), clipped)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weight(s, 0.0, "epsilon")


def test_zero_terminal_snr_loss_is_finite():
    zsnr = NoiseSchedule(ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    x0, noise, _ = example()
    t = torch.tensor([0, 100, 998, 999])
    ab = zsnr.alphas_cumprod[t]
    assert ab[-1] == 0
    for kind in ("epsilon", "v_prediction"):
        loss = diffusion_loss(torch.zeros_like(x0), x0, noise, ab, kind, snr_gamma=5.0)
        assert torch.isfinite(loss)


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mse():
    x0, noise, t = example()
    ab = SCHEDULE.alphas_cumprod[t]
    pred = torch.randn_like(x0)
    per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
    w = min_snr_weight(snr(ab), 5.0, "epsilon")
    assert torch.allclose(diffusion_loss(pred, x0, noise, ab, "epsilon", snr_gamma=5.0).double(),
                          (per_sample * w).mean(), rtol=1e-5)
    assert torch.allclose(diffusion_loss(pred, x0, noise, ab, "epsilon").double(), per_sample.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type 'eps'"):
        diffusion_loss(pred, x0, noise, ab, "eps")


def test_offset_noise():
    shape = (2000, 3, 4, 4)
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    off = offset_noise(shape, 0.5, torch.Generator().manual_seed(0))
    assert off.shape == shape and off.dtype == torch.float32
    # per-(sample, channel) means carry the offset: variance 1/16 (pixel noise) + 0.25 (offset)
    assert abs(off.mean(dim=(2, 3)).var() - (1 / 16 + 0.25)) < 0.02
    assert torch.equal(off, offset_noise(shape, 0.5, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"\(B, C, ...\)"):
        offset_noise((4,), 0.1)
