"""One model contract: wrap an ε-, v- or x0-predicting network as a denoiser D(x, σ) ≈ E[x0 | x].

The network was trained in VP space on integer timesteps; samplers work in σ-space (x = x0 + σ·n).  This wrapper
does the whole conversion, and nothing else in ldm does it:
  * input scaling c_in = 1/sqrt(σ² + 1) maps x to the VP sample x_t the network saw in training;
  * σ maps to the timestep t whose σ_t = σ (log-σ interpolation), rounded to an integer by default;
  * the network's output becomes an x0 estimate (Karras et al. 2022, Table 1, VP column):
      ε:  x0 = x − σ·ε
      v:  x0 = c_skip·x − c_out·v,  c_skip = 1/(σ² + 1),  c_out = σ/sqrt(σ² + 1)   (Salimans & Ho 2022)
      x0: x0 = network output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.schedules import PREDICTION_TYPES, NoiseSchedule


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """σ as a (B,) tensor on x's device, float32 (float64 if x is float64)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _view(v: Tensor, x: Tensor) -> Tensor:
    """(B,) → (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


class Denoiser:
    """D(x, σ, **cond) -> x0 estimate, for a network model(x_t, t, **cond) trained on `schedule`."""

    def __init__(self, model, schedule: NoiseSchedule, prediction_type: str | None = None, *,
                 quantize: bool = True, dtype: torch.dtype | None = None):
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.quantize = quantize
        self.dtype = dtype

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep for σ: fractional by log-σ interpolation, rounded if `quantize`."""
        if sigma.ndim == 1 and len(sigma) > 1 and (sigma == sigma[0]).all():
            return self.timestep(sigma[:1]).expand(len(sigma))  # the usual case: one σ for the whole batch
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.quantize else t

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = batch_sigma(sigma, x)
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32)
        s = _view(sigma, x)
        c_in = (s**2 + 1).rsqrt()
        net_dtype = self.dtype or x.dtype
        x_t = (x * c_in).to(net_dtype)
        cond = {k: v.to(net_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        out = self.model(x_t, t, **cond)
        if not torch.is_tensor(out):
            raise TypeError(f"the model must return a Tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        out = out.to(x.dtype)
        if not torch.isfinite(out).all():
            kind = "NaN" if torch.isnan(out).any() else "inf"
            raise FloatingPointError(f"model output contains {kind} at sigma={sigma.tolist()} "
                                     f"(t={t.tolist()}, dtype {net_dtype})")
        if self.prediction_type == "epsilon":
            return x - s.to(x.dtype) * out
        if self.prediction_type == "v_prediction":
            c_skip = 1 / (s**2 + 1)
            c_out = s * c_in
            return (c_skip * x - c_out * out).to(x.dtype)
        return out
