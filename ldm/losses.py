"""Training losses for ε-, v- and x0-prediction, with min-SNR-γ weighting and offset noise.

A training example is x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (VP, Ho et al. 2020); the network regresses one
of three equivalent targets.  All per-sample arguments `alphas_cumprod_t` have shape (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.rng import Generators, randn
from ldm.schedules import PREDICTION_TYPES


def _view(v: Tensor, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, device=like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """What the network should output: ε; v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans & Ho 2022, §4); or x0."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    ab = _view(alphas_cumprod_t, x0).to(torch.float64)
    return (ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()).to(x0.dtype)


def snr(alphas_cumprod_t: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ/(1 − ᾱ) (Kingma et al. 2021); 0 at a zero-terminal-SNR last step."""
    ab = torch.as_tensor(alphas_cumprod_t, dtype=torch.float64)
    return ab / (1 - ab)


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The x0-space weight min(SNR, γ) expressed for the target actually regressed: an ε-loss equals the x0-loss
    divided by SNR, a v-loss the x0-loss divided by SNR + 1.  So ε: min(SNR, γ)/SNR = min(1, γ/SNR);
    v: min(SNR, γ)/(SNR + 1); x0: min(SNR, γ).
    """
    _check_prediction_type(prediction_type)
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    snr = torch.as_tensor(snr)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # finite at SNR = 0 (γ/0 = inf -> 1)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def offset_noise(shape, strength: float, generator: Generators = None, device=None,
                 dtype: torch.dtype | None = None) -> Tensor:
    """N(0, I) noise plus a per-(sample, channel) constant of size `strength` (Guttenberg 2023, "Diffusion
    with Offset Noise"): lets a model learn to change an image's mean brightness."""
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"offset_noise expects (B, C, ...) shapes, got {shape}")
    dtype = dtype or torch.float32
    noise = randn(shape, generator, device=device, dtype=dtype)
    if strength:
        offset = randn(shape[:2] + (1,) * (len(shape) - 2), generator, device=device, dtype=dtype)
        noise = noise + strength * offset
    return noise


def diffusion_loss(pred: Tensor, x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor, prediction_type: str,
                   snr_gamma: float | None = None) -> Tensor:
    """Mean squared error against the training target, optionally min-SNR-γ weighted per sample (float32)."""
    target = training_target(prediction_type, x0, noise, alphas_cumprod_t)
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    if snr_gamma is None:
        return per_sample.mean()
    weight = min_snr_weight(snr(alphas_cumprod_t), snr_gamma, prediction_type)
    return (per_sample * weight.to(per_sample)).mean()
