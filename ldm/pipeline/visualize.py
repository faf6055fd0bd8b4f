"""The classic diffusion figure: the forward process on one image and the reverse process from pure noise.

Top row: q(x_t | x_0) at several t (Ho et al. 2020, eq. 4) — the image dissolving into noise. Bottom row: a
sampler run from pure noise, shown at the same t — noise turning into an image. Column k of both rows is the
same noise level, so the reverse row reads right to left.

``forward_reverse_figure`` needs only a schedule, a denoiser D(x, σ) -> x0 and an optional decoder, so it serves
a latent Pipeline (``pipeline_figure``) and a pixel-space model (the digits example) alike.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from ldm.pipeline import images as img
from ldm.samplers import get_sampler

DEFAULT_TIMESTEPS = (0, 100, 250, 500, 750, 999)


def forward_reverse_figure(schedule, denoiser: Callable, x0: torch.Tensor, *,
                           timesteps: Sequence[int] = DEFAULT_TIMESTEPS, decode: Callable | None = None,
                           sampler: str = "euler", steps: int = 50, seed: int = 0, cell: int = 96,
                           labels: bool = True) -> Image.Image:
    """A 2-row grid (see ``forward_reverse`` for the arguments); decode: (B, C, h, w) -> (B, 1|3, H, W) in
    about [-1, 1] (None: x is already an image); cell: pixels per picture."""
    forward, reverse = forward_reverse(schedule, denoiser, x0, timesteps=timesteps, sampler=sampler, steps=steps,
                                       seed=seed)
    decode = decode or (lambda x: x)
    with torch.no_grad():
        rows = [[decode(x) for x in forward], [decode(x) for x in reverse]]
    return _grid(rows, sorted({int(t) for t in timesteps}), cell, labels)


def forward_reverse(schedule, denoiser: Callable, x0: torch.Tensor, *, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                    sampler: str = "euler", steps: int = 50, seed: int = 0):
    """The two rows as VP samples x_t (what a picture of "x_t" shows), one per t in increasing order.

    schedule: ``ldm.schedules.NoiseSchedule``; denoiser(x, σ) -> x0 in σ-space; x0: one clean sample (1, C, h, w)
    in the denoiser's space. forward[k] ~ q(x_t | x0) at t_k (one noise draw for all t); reverse[k]: a sampler
    run from pure noise at the largest t, stopped at each t_k (at σ = 0 for t = 0: the finished sample), with
    ``steps`` sampler steps shared between the gaps in proportion to their length in t."""
    ts = sorted({int(t) for t in timesteps})
    if not ts or ts[0] < 0 or ts[-1] >= schedule.num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {list(timesteps)}")
    if x0.ndim != 4 or x0.shape[0] != 1:
        raise ValueError(f"x0 must be one sample shaped (1, C, h, w), got {tuple(x0.shape)}")
    fn = get_sampler(sampler)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    forward = [schedule.q_sample(x0, t, noise) for t in ts]

    sigma_of = [0.0 if t == 0 else float(schedule.t_to_sigma(t)) for t in ts]
    x = torch.randn(x0.shape, generator=generator).to(x0) * math.sqrt(1.0 + sigma_of[-1] ** 2)
    reverse = [_vp(x, sigma_of[-1])]
    span = max(ts[-1] - ts[0], 1)
    for k in range(len(ts) - 1, 0, -1):
        n = max(1, round(steps * (ts[k] - ts[k - 1]) / span))
        sigmas = schedule.t_to_sigma(torch.linspace(ts[k], ts[k - 1], n + 1, dtype=torch.float64))
        if ts[k - 1] == 0:
            sigmas[-1] = 0.0
        x = fn(denoiser, x, sigmas, generator=generator)
        reverse.insert(0, _vp(x, sigma_of[k - 1]))
    return forward, reverse


def pipeline_figure(pipe, prompt: str, image=None, *, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                    guidance: float | None = None, sampler: str = "euler", steps: int = 50, seed: int = 0,
                    cell: int = 128, labels: bool = True) -> Image.Image:
    """The figure for a latent ``Pipeline``: the forward row noises ``image`` (default: the pipeline's own
    picture of ``prompt`` at ``seed``) in latent space; the reverse row samples ``prompt`` with guidance."""
    req = pipe.request(prompt, guidance=guidance, sampler=sampler, seed=seed)
    if image is None:
        image = pipe(prompt, guidance=guidance, sampler=sampler, seed=seed, steps=steps, progress=False)[0]
    source = img.load_image(image).resize((req.width, req.height), Image.Resampling.LANCZOS)
    z0 = pipe.encode_images(img.to_tensor(source))
    return forward_reverse_figure(pipe.schedule, pipe.guided_denoiser(req), z0, timesteps=timesteps,
                                  decode=pipe.decode_latents, sampler=sampler, steps=steps, seed=seed, cell=cell,
                                  labels=labels)


def _vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ-space x -> the variance-preserving x_t = x / sqrt(1 + σ²) that a picture of "x_t" shows."""
    return x / math.sqrt(1.0 + sigma * sigma)


def _to_image(x: torch.Tensor, cell: int) -> Image.Image:
    array = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    image = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
    small = max(image.size) < cell
    return image.resize((cell, cell), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)


def _grid(rows, ts, cell: int, labels: bool) -> Image.Image:
    font = ImageFont.load_default()
    left, top = (80, 18) if labels else (0, 0)
    sheet = Image.new("RGB", (left + cell * len(ts), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row, name) in enumerate(zip(rows, ("forward", "reverse"))):
        for c, x in enumerate(row):
            sheet.paste(_to_image(x, cell), (left + c * cell, top + r * cell))
        if labels:
            draw.text((4, top + r * cell + cell // 2 - 6), name, fill="black", font=font)
    if labels:
        for c, t in enumerate(ts):
            draw.text((left + c * cell + 4, 3), f"t = {t}", fill="black", font=font)
    return sheet
