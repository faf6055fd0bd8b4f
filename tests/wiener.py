"""A model that knows its data exactly, for behavioural tests of the pipeline and the diffusion figure.

Data: smooth periodic random fields, x0 = irfft2(rfft2(w)·sqrt(P)) with w white noise, so x0 is Gaussian with a
covariance that is diagonal in the 2-D Fourier basis (power spectrum P). The exact denoiser is then the Wiener
filter E[x0 | x0 + σn] = irfft2(rfft2(x)·P/(P + σ²)). ``knowing_pipeline`` runs it in pixel space through an
identity "VAE", so what a test checks is the pipeline's own logic (noise levels, partial noising, reconstruction).
"""

import numpy as np
import torch

SIZE = 32


def power_spectrum(size: int = SIZE, length: float = 4.0) -> torch.Tensor:
    ky = torch.fft.fftfreq(size)[:, None]
    kx = torch.fft.rfftfreq(size)[None, :]
    p = torch.exp(-(kx**2 + ky**2) * (2 * np.pi * length) ** 2 / 2)
    return (p / p.mean() * 0.09).double()  # pixel std about 0.3 in [-1, 1] units


def smooth_fields(n: int, seed: int) -> torch.Tensor:
    """n samples (n, 3, SIZE, SIZE), float32."""
    w = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.fft.irfft2(torch.fft.rfft2(w, norm="ortho") * power_spectrum().sqrt(), s=(SIZE, SIZE),
                            norm="ortho").float()


def wiener(x: torch.Tensor, sigma) -> torch.Tensor:
    """E[x0 | x] for x = x0 + σ·n in σ-space; sigma: scalar or (B,)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    power = power_spectrum(x.shape[-1])
    gain = power / (power + sigma**2)
    x0 = torch.fft.irfft2(torch.fft.rfft2(x.double(), norm="ortho") * gain, s=x.shape[-2:], norm="ortho")
    return x0.to(x.dtype)


class WienerUNet(torch.nn.Module):
    """Stands in for the U-Net: the exact ε-prediction for smooth_fields() data (ignores the text context)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.config = type("Config", (), {"sample_size": SIZE, "in_channels": 3})()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that .to() / .eval() behave as on a network

    def forward(self, x_t, t, context):
        sigma = self.schedule.t_to_sigma(t.double().cpu()).view(-1, 1, 1, 1)
        x = x_t.double() * (1 + sigma**2).sqrt()  # back to σ-space
        return ((x - wiener(x, sigma.flatten())) / sigma).to(x_t.dtype)


class IdentityVAE(torch.nn.Module):
    """Latents = pixels (scale 1, 3 channels): the pipeline's encode/decode calls with nothing in between."""

    config = type("Config", (), {"block_out_channels": (3,), "latent_channels": 3, "scaling_factor": 1.0,
                                 "shift_factor": None})()

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda _: x.float()})()

    def decode(self, z, dtype=None):
        return z.to(dtype or torch.float32)


def knowing_pipeline():
    """A Pipeline whose 'U-Net' is the exact denoiser of smooth_fields(), in pixel space."""
    from ldm import Pipeline
    from ldm.checkpoints import Components
    from ldm.schedules import NoiseSchedule, ScheduleConfig
    from tiny_models import tiny_text_encoder

    schedule = ScheduleConfig()
    return Pipeline(Components(unet=WienerUNet(NoiseSchedule(schedule)), vae=IdentityVAE(),
                               text_encoder=tiny_text_encoder(), schedule=schedule, info=None))
