"""Figures of the digits example: the forward/reverse processes, the sampler's steps, and sample grids.

The forward/reverse figure is ``ldm.visualize.forward_reverse_figure`` (the ``ldm visualize`` code path) with an
8×8-digit "decoder"; the others are grids drawn here.  Pixels are shown as they are (nearest-neighbour zoom).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ldm.examples.digits import CLASSES, Judge
from ldm.examples.digits_eval import DigitModels, SampleConfig, Setting, generate, guided
from ldm.pipeline.visualize import forward_reverse_figure

MARGIN = 0.8  # the light grey drawn between digits (in [-1, 1] pixel units)


def forward_reverse(models: DigitModels, digit: int = 3, scale: float = 3.0, sampling: SampleConfig = SampleConfig(),
                    seed: int = 0, steps: int = 100, cell: int = 80) -> Image.Image:
    """The classic figure (``ldm.visualize.forward_reverse_figure``): a held-out `digit` (the one the judge is
    surest of) noised forward at several t, and the reverse process from pure noise to a new digit of the same
    class (classifier-free guidance at `scale`), shown at the same t."""
    if digit not in range(CLASSES):
        raise ValueError(f"digit must be in 0..{CLASSES - 1}, got {digit!r}")
    candidates = torch.nonzero(models.data.test_y == digit).flatten()
    confidence = models.judge.model.predict_proba(models.data.test_x[candidates].flatten(1).numpy())[:, digit]
    best = int(candidates[int(confidence.argmax())])
    x0, label = models.data.test_x[best:best + 1], models.data.test_y[best:best + 1]
    return forward_reverse_figure(models.schedule, guided(models, Setting("cfg", scale), label), x0,
                                  decode=_framed, sampler=sampling.sampler, steps=steps, seed=seed, cell=cell)


def _framed(x: Tensor) -> Tensor:
    """The figure's "decoder": a one-pixel light margin around each 8×8 digit, so neighbouring cells stay apart."""
    return F.pad(x, (1, 1, 1, 1), value=MARGIN)


def _cell(image: Tensor, cell: int) -> Image.Image:
    pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(pixels, "L").convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)


def samples_figure(panels: Sequence[tuple[str, Tensor, Tensor]], judge: Judge, columns: int = 8,
                   cell: int = 24) -> Image.Image:
    """Panels side by side; panel = (title, images (10·k, 1, 8, 8) grouped by class as requested_classes(k),
    the requested/true labels).  Row r is digit r; a green frame means the judge names the row's digit, red not."""
    font = ImageFont.load_default(size=12)
    pad, frame, top, left = 12, 2, 20, 14
    box = cell + 2 * frame
    panel_w = columns * box
    sheet = Image.new("RGB", (left + len(panels) * (panel_w + pad), top + CLASSES * box), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(CLASSES):
        draw.text((2, top + r * box + box // 2 - 6), str(r), fill="black", font=font)
    for p, (title, images, labels) in enumerate(panels):
        x_off = left + p * (panel_w + pad)
        draw.text((x_off, 4), title, fill="black", font=font)
        verdict = judge.predict(images) == labels
        for digit in range(CLASSES):
            rows = torch.nonzero(labels == digit).flatten()[:columns]
            for c, i in enumerate(rows.tolist()):
                x, y = x_off + c * box, top + digit * box
                draw.rectangle((x, y, x + box - 1, y + box - 1), fill=(40, 160, 60) if verdict[i] else (210, 40, 40))
                sheet.paste(_cell(images[i], cell), (x + frame, y + frame))
    return sheet


def denoising_figure(models: DigitModels, digits: Sequence[int] = (0, 3, 7), scale: float = 3.0,
                     sampling: SampleConfig = SampleConfig(), seed: int = 0, columns: int = 7,
                     cell: int = 48) -> Image.Image:
    """Inside the sampler: for each digit, one row of the noisy sample x at some of the steps (shown VP-scaled,
    x/sqrt(1 + σ²), as the network sees it) and below it the denoiser's estimate of the clean digit at that step,
    D(x, σ) = x − σ·ε̂ — the network's guess, which the sampler moves x towards."""
    y = torch.tensor(list(digits))
    frames: list[tuple[float, Tensor, Tensor]] = []

    def record(info: dict) -> None:
        frames.append((info["sigma"], info["x"] / (1 + info["sigma"] ** 2) ** 0.5, info["denoised"]))

    final = generate(guided(models, Setting("cfg", scale), y), len(y), models.schedule, sampling, seed, record)
    frames.append((0.0, final, final))
    shown = [frames[round(i * (len(frames) - 1) / (columns - 1))] for i in range(columns)]
    font = ImageFont.load_default(size=12)
    left, top, box = 120, 20, cell + 4
    sheet = Image.new("RGB", (left + columns * box, top + 2 * len(y) * box + (len(y) - 1) * 8), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), "noise level sigma:", fill="black", font=font)
    for c, (sigma, _, _) in enumerate(shown):
        draw.text((left + c * box + 2, 3), f"{sigma:.2g}", fill="black", font=font)
    for r in range(len(y)):
        for k, (name, part) in enumerate((("sample x", 1), ("guess of x0", 2))):
            row_top = top + (2 * r + k) * box + r * 8
            draw.text((4, row_top + box // 2 - 6), f"{int(y[r])}: {name}", fill="black", font=font)
            for c, frame in enumerate(shown):
                sheet.paste(_cell(frame[part][r], cell), (left + c * box + 2, row_top + 2))
    return sheet
