"""Guidance: classifier-free (one batched forward, scale 1, rescale vs diffusers), classifier guidance."""

import pytest
import torch
from gaussian import GaussianMixture

from ldm.guidance import classifier, classifier_free, conditioned
from ldm.samplers import SAMPLERS
from ldm.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("single_thread")


class ToyDenoiser:
    """x0 estimate depending on x, σ and a context tensor; records every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, context):
        self.batches.append(x.shape[0])
        s = sigma.reshape(-1, 1, 1, 1)
        return x / (1 + s**2) + torch.tanh(context.mean(dim=(1, 2))).reshape(-1, 1, 1, 1) * (1 + x.abs())


def inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 5, 5, generator=g) * 3
    cond = {"context": torch.randn(batch, 7, 16, generator=g)}
    uncond = {"context": torch.randn(1, 7, 16, generator=g)}  # one empty-prompt embedding for all rows
    return x, torch.full((batch,), 2.5), cond, uncond


def test_scale_one_is_the_conditional_denoiser_alone():
    x, sigma, cond, uncond = inputs()
    model = ToyDenoiser()
    out = classifier_free(model, cond, uncond, scale=1.0)(x, sigma)
    assert model.batches == [3]
    assert torch.equal(out, ToyDenoiser()(x, sigma, **cond))


@pytest.mark.parametrize("scale", [0.0, 4.0, 7.5])
def test_one_batched_forward_and_the_cfg_formula(scale):
    x, sigma, cond, uncond = inputs()
    model = ToyDenoiser()
    out = classifier_free(model, cond, uncond, scale=scale)(x, sigma)
    assert model.batches == [6]  # [uncond; cond] in a single call
    ref = ToyDenoiser()
    x0_u = ref(x, sigma, context=uncond["context"].expand(3, -1, -1))
    x0_c = ref(x, sigma, **cond)
    assert torch.allclose(out, x0_u + scale * (x0_c - x0_u), atol=1e-5)


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """The reference: diffusers' rescale_noise_cfg (pipeline_stable_diffusion.py), whose import pulls in
    transformers and takes seconds, restated: per-sample std of ε_cfg matched to ε_c, then mixed."""
    dims = list(range(1, noise_cfg.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def test_rescale_is_applied_to_epsilon_as_in_diffusers():
    x, sigma, cond, uncond = inputs()
    scale, rescale = 7.5, 0.7
    out = classifier_free(ToyDenoiser(), cond, uncond, scale=scale, rescale=rescale)(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    eps_u = (x - ToyDenoiser()(x, sigma, context=uncond["context"].expand(3, -1, -1))) / s
    eps_c = (x - ToyDenoiser()(x, sigma, **cond)) / s
    eps = rescale_noise_cfg(eps_u + scale * (eps_c - eps_u), eps_c, guidance_rescale=rescale)
    assert torch.allclose(out, x - s * eps, atol=1e-4)


def test_bad_conditions():
    x, sigma, cond, uncond = inputs()
    with pytest.raises(ValueError, match="cond keys"):
        classifier_free(ToyDenoiser(), cond, {"other": uncond["context"]}, 5.0)
    bad = classifier_free(ToyDenoiser(), cond, {"context": torch.zeros(2, 7, 16)}, 5.0)
    with pytest.raises(ValueError, match=r"uncond\['context'\] has batch size 2, but x has 3"):
        bad(x, sigma)
    with pytest.raises(ValueError, match="rescale must be in"):
        classifier_free(ToyDenoiser(), cond, uncond, 5.0, rescale=1.5)


def test_conditioned_binds_the_condition():
    x, sigma, cond, _ = inputs()
    assert torch.equal(conditioned(ToyDenoiser(), **cond)(x, sigma), ToyDenoiser()(x, sigma, **cond))


def test_classifier_guidance_shift_is_scale_sigma2_grad():
    x, sigma, cond, _ = inputs()
    target = torch.randn(4, 5, 5)
    base = conditioned(ToyDenoiser(), **cond)

    def log_prob(x, sigma):  # ∇ = −(x − target)
        return -0.5 * ((x - target) ** 2).flatten(1).sum(1)

    with torch.no_grad():  # samplers run without autograd; guidance must still get its gradient
        out = classifier(base, log_prob, scale=3.0)(x, sigma)
    expected = base(x, sigma) + 3.0 * sigma.reshape(-1, 1, 1, 1) ** 2 * -(x - target)
    assert torch.allclose(out, expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"log_prob must return shape \(3,\)"):
        classifier(base, lambda x, s: x.sum(), 1.0)(x, sigma)


def test_classifier_guidance_samples_the_posterior():
    """Prior x0 ~ N(μ, s²), observation y ~ N(x0, τ²).  With the exact log p(y | x_σ) = log N(y; E[x0|x_σ],
    Var[x0|x_σ] + τ²), guidance at scale 1 makes the sampler draw from p(x0 | y) = N(m, v) in closed form."""
    mu, s, tau, y = 1.0, 2.0, 0.5, -1.0
    data = GaussianMixture.gaussian([mu], [s])

    def log_prob(x, sigma):
        sig2 = sigma.reshape(-1, 1) ** 2
        mean = mu + s**2 / (s**2 + sig2) * (x - mu)
        var = s**2 * sig2 / (s**2 + sig2) + tau**2
        return (-0.5 * (y - mean) ** 2 / var - 0.5 * var.log()).sum(1)

    v = 1 / (1 / s**2 + 1 / tau**2)
    m = v * (mu / s**2 + y / tau**2)
    sigmas = NoiseSchedule().sigmas_for(40, "karras")
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    x = m + z * (v + sigmas[0] ** 2) ** 0.5
    out = SAMPLERS["heun"](classifier(data.denoise, log_prob, 1.0), x, sigmas)
    assert abs(out.mean() - m) < 0.01 and abs(out.var() / v - 1) < 0.03
    unguided = SAMPLERS["heun"](data.denoise, mu + z * (s**2 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert abs(unguided.mean() - mu) < 0.01 and abs(unguided.var() / s**2 - 1) < 0.03
