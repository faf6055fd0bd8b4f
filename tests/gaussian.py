"""Analytic test data: Gaussian mixtures with diagonal covariances, whose exact denoiser is closed form.

For x0 ~ Σ_k w_k N(μ_k, diag(s_k²)) and x = x0 + σ·n, the noisy marginal is Σ_k w_k N(μ_k, diag(s_k² + σ²)),
and Tweedie's formula gives E[x0 | x] = Σ_k r_k(x)·(μ_k + s_k²/(s_k² + σ²)·(x − μ_k)), where r_k(x) is the
posterior probability of component k.  With one component this is the Gaussian case, whose probability-flow
ODE is solved exactly by x0 = μ + s/sqrt(s² + σ²)·(x − μ).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # (K, D)
        self.weights = self.weights / self.weights.sum()

    @classmethod
    def gaussian(cls, mean, std) -> "GaussianMixture":
        return cls([1.0], [mean], [std])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def noisy_sample(self, n: int, sigma: float, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the exact marginal at noise level σ."""
        return self.sample(n, generator) + sigma * torch.randn(n, self.dim, generator=generator,
                                                               dtype=torch.float64)

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """E[x0 | x] at noise level σ (scalar or (B,)); x has shape (B, D); computed in float64."""
        xd = x.double()
        s = torch.as_tensor(sigma, dtype=torch.float64).to("cpu").reshape(-1)
        if (s == s[0]).all():
            s = s[:1]  # one noise level for the whole batch (the usual case): cheaper broadcasting
        var = self.stds[None] ** 2 + s.reshape(-1, 1, 1) ** 2  # (B or 1, K, D)
        diff = xd[:, None, :] - self.means[None]  # (B, K, D)
        component_means = self.means[None] + self.stds[None] ** 2 / var * diff
        if len(self.weights) == 1:
            return component_means[:, 0].to(x.dtype)
        log_norm = self.weights.log()[None] - 0.5 * (var.log() + math.log(2 * math.pi)).sum(-1)  # (B or 1, K)
        log_r = log_norm - 0.5 * (diff**2 / var).sum(-1)
        r = torch.softmax(log_r, dim=1)  # posterior responsibilities (B, K)
        return (r[..., None] * component_means).sum(1).to(x.dtype)

    def flow_map(self, x: Tensor, sigma: float, sigma_to: float = 0.0) -> Tensor:
        """Exact probability-flow ODE solution from σ to σ_to (single Gaussian only)."""
        assert len(self.weights) == 1
        mu, s = self.means[0], self.stds[0]
        return (mu + ((s**2 + sigma_to**2) / (s**2 + sigma**2)).sqrt() * (x.double() - mu)).to(x.dtype)

    def eps_model(self, schedule):
        """The exact denoiser as a VP ε-network model(x_t, t) trained on `schedule` (t may be fractional)."""

        def model(x_t: Tensor, t) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            if (t == t[0]).all():
                t = t[:1]  # one timestep for the whole batch: convert it once
            sigma = schedule.t_to_sigma(t).expand(x_t.shape[0]).to(x_t.device)
            x = x_t.double() * (1 + sigma[:, None] ** 2).sqrt()
            return ((x - self.denoise(x, sigma)) / sigma[:, None]).to(x_t.dtype)

        return model
