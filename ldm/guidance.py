"""Guidance: functions from a denoiser to a denoiser.

A denoiser here is D(x, σ, **cond) -> x0 estimate (ldm.denoiser.Denoiser or anything with that call).  Each
function below returns a plain callable (x, σ) -> x0 that a sampler can use directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.denoiser import batch_sigma

GuidedDenoiser = Callable[[Tensor, Tensor], Tensor]


def _batched_cond(key: str, uncond_value, cond_value, batch: int):
    """[uncond; cond] along the batch dimension (batch-1 tensors are broadcast to `batch`)."""
    if not torch.is_tensor(cond_value) and not torch.is_tensor(uncond_value):
        if cond_value != uncond_value:
            raise ValueError(f"classifier_free: non-tensor condition {key!r} differs between cond and uncond")
        return cond_value
    parts = []
    for name, value in (("uncond", uncond_value), ("cond", cond_value)):
        if not torch.is_tensor(value):
            raise TypeError(f"classifier_free: {name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        if value.shape[0] != batch:
            raise ValueError(f"classifier_free: {name}[{key!r}] has batch size {value.shape[0]}, "
                             f"but x has {batch}")
        parts.append(value)
    return torch.cat(parts)


def classifier_free(denoiser, cond: dict, uncond: dict, scale: float, rescale: float = 0.0) -> GuidedDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): x0 = x0_u + scale·(x0_c − x0_u).

    Both branches run in one batched forward, [uncond; cond].  At scale 1 the result is the conditional
    denoiser, so only the conditional branch runs.  `rescale` ∈ [0, 1] is the guidance rescale of Lin et al.
    2023 (§3.4), applied to the ε implied by x0 as diffusers' rescale_noise_cfg does: ε_cfg is scaled to the
    per-sample standard deviation of ε_c, and the result mixed with ε_cfg in proportion `rescale`.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"classifier_free: cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"classifier_free: rescale must be in [0, 1], got {rescale}")

    def guided(x: Tensor, sigma) -> Tensor:
        if scale == 1.0:
            return denoiser(x, sigma, **cond)
        sigma = batch_sigma(sigma, x)
        b = x.shape[0]
        both = {k: _batched_cond(k, uncond[k], cond[k], b) for k in cond}
        x0_u, x0_c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        if rescale > 0:
            # ε = (x − x0)/σ; the σ cancels in the ratio of standard deviations, so work with x − x0.
            dims = list(range(1, x.ndim))
            ratio = (x - x0_c).std(dim=dims, keepdim=True) / (x - x0).std(dim=dims, keepdim=True)
            x0 = x - (x - x0) * (rescale * ratio + (1.0 - rescale))
        return x0

    return guided


def classifier(denoiser, log_prob: Callable[[Tensor, Tensor], Tensor], scale: float) -> GuidedDenoiser:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 in σ-space): x0 += scale·σ²·∇_x log p(y | x).

    log_prob(x, σ) returns log p(y | x_σ) per sample, shape (B,).  Adding scale·∇ log p(y | x) to the score
    ∇ log p(x) = (x0 − x)/σ² shifts the x0 estimate by scale·σ²·∇ log p(y | x).  The gradient comes from
    torch.autograd, even when the sampler runs under torch.no_grad().
    """

    def guided(x: Tensor, sigma, **cond) -> Tensor:
        x0 = denoiser(x, sigma, **cond)
        sigma = batch_sigma(sigma, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = log_prob(x_in, sigma)
            if lp.shape != (x.shape[0],):
                raise ValueError(f"classifier: log_prob must return shape ({x.shape[0]},), got {tuple(lp.shape)}")
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        s2 = (sigma**2).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x0 + scale * s2 * grad.detach()

    return guided


def conditioned(denoiser, **cond) -> GuidedDenoiser:
    """Bind a condition to a denoiser, with no guidance: (x, σ) -> denoiser(x, σ, **cond)."""

    def bound(x: Tensor, sigma) -> Tensor:
        return denoiser(x, sigma, **cond)

    return bound


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance-scale embedding an LCM-distilled U-Net takes instead of classifier-free guidance (Luo et al.
    2023, "Latent Consistency Models", §4.2 after Meng et al. 2023's w-conditioning): sinusoids of 1000·w at
    frequencies 10000^(-i / (dim/2 - 1)), [sin ‖ cos], a zero column when dim is odd. (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_conditions(unet_config, guidance: float, batch: int) -> dict[str, torch.Tensor]:
    """{"timestep_cond": w-embedding of guidance − 1} for a U-Net with ``time_cond_proj_dim`` (LCM-distilled;
    it runs without a classifier-free batch, as diffusers' LatentConsistencyModelPipeline), else {}."""
    dim = getattr(unet_config, "time_cond_proj_dim", None)
    if not dim:
        return {}
    return {"timestep_cond": guidance_embedding(torch.full((batch,), guidance - 1.0), dim)}
