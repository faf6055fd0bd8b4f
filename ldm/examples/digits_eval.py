"""Sampling and measuring the digits example: guided denoisers and the judge's accuracy table.

A *setting* names how a batch of digits is generated for requested classes y:
  * "unconditional": the denoiser's NULL_CLASS branch alone — it does not know y, so the judge agrees with the
    request about one time in ten;
  * "cfg": classifier-free guidance ``ldm.guidance.classifier_free`` at a scale (1 = the conditional branch alone);
  * "classifier": classifier guidance ``ldm.guidance.classifier`` — the gradient of the noisy classifier's
    log p(y | x_t) steers the *unconditional* branch (the NULL_CLASS input of the same network).
Every setting starts from the same noise (the same seed), so the table compares guidance and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.denoiser import Denoiser
from ldm.examples.digits import (CLASSES, NULL_CLASS, SIZE, Digits, DigitsConfig, Judge, NoisyClassifier,
                                 load_digits, train_denoiser, train_noisy_classifier)
from ldm.guidance import classifier, classifier_free, conditioned
from ldm.rng import randn
from ldm.samplers import get_sampler
from ldm.schedules import NoiseSchedule

GUIDANCE_KINDS = ("unconditional", "cfg", "classifier")


@dataclass(frozen=True)
class Setting:
    """One row of the table: a guidance kind and its scale."""

    kind: str
    scale: float = 1.0

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"Setting.kind={self.kind!r} is not one of {GUIDANCE_KINDS}")

    @property
    def label(self) -> str:
        if self.kind == "unconditional":
            return "unconditional (no guidance)"
        if self.kind == "cfg":
            return f"classifier-free guidance, scale {self.scale:g}" + (" (= conditional)" if self.scale == 1 else "")
        return f"classifier guidance, scale {self.scale:g}"


DEFAULT_SETTINGS = (Setting("unconditional"), Setting("cfg", 1.0), Setting("cfg", 3.0), Setting("cfg", 5.0),
                    Setting("classifier", 1.0), Setting("classifier", 5.0))


@dataclass(frozen=True)
class SampleConfig:
    """How samples are drawn: any sampler of ``ldm.samplers.SAMPLERS`` over a σ spacing of the schedule."""

    sampler: str = "dpmpp_2m"
    steps: int = 25
    spacing: str = "karras"


@dataclass
class DigitModels:
    """What the example trains: the schedule, the wrapped denoiser, the noisy classifier and the judge."""

    config: DigitsConfig
    data: Digits
    schedule: NoiseSchedule
    denoiser: Denoiser
    classifier: NoisyClassifier
    judge: Judge
    seconds: dict[str, float]      # wall-clock training time per model
    cpu_seconds: dict[str, float]  # CPU time per model: the wall time on an otherwise idle machine


def train_all(cfg: DigitsConfig, log: Callable[[str], None] | None = None) -> DigitModels:
    """Load the digits and train the denoiser, the noisy classifier and the judge, timing each."""
    data = load_digits(cfg.held_out, cfg.seed)
    seconds, cpu_seconds = {}, {}

    def timed(name: str, fit: Callable):
        wall, cpu = time.perf_counter(), time.process_time()
        model = fit()
        seconds[name], cpu_seconds[name] = time.perf_counter() - wall, time.process_time() - cpu
        return model

    net = timed("denoiser", lambda: train_denoiser(data, cfg, log))
    noisy = timed("noisy classifier", lambda: train_noisy_classifier(data, cfg, log))
    judge = timed("judge", lambda: Judge(data, cfg.seed))
    schedule = cfg.schedule()
    return DigitModels(cfg, data, schedule, Denoiser(net, schedule), noisy, judge, seconds, cpu_seconds)


def guided(models: DigitModels, setting: Setting, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The (x, σ) -> x0 denoiser that generates digits of classes y under `setting`."""
    null = torch.full_like(y, NULL_CLASS)
    if setting.kind == "unconditional":
        return conditioned(models.denoiser, y=null)
    if setting.kind == "cfg":
        return classifier_free(models.denoiser, {"y": y}, {"y": null}, setting.scale)
    log_prob = models.classifier.log_prob(models.schedule, y)
    return classifier(conditioned(models.denoiser, y=null), log_prob, setting.scale)


def generate(denoiser: Callable, n: int, schedule: NoiseSchedule, sampling: SampleConfig = SampleConfig(),
             seed: int = 0, callback: Callable[[dict], None] | None = None) -> Tensor:
    """n digits (n, 1, 8, 8) in [-1, 1]: noise x = σ_max·n, integrated to σ = 0 by the chosen sampler
    (`callback` as the samplers take it: once per step, with the sample and its x0 estimate)."""
    sigmas = schedule.sigmas_for(sampling.steps, sampling.spacing)
    g = torch.Generator().manual_seed(seed)
    x = randn((n, 1, SIZE, SIZE), g) * float(sigmas[0])
    with torch.no_grad():
        x = get_sampler(sampling.sampler)(denoiser, x, sigmas, generator=g, callback=callback)
    return x.clamp(-1.0, 1.0)


def requested_classes(per_class: int) -> Tensor:
    """0, 0, ..., 1, 1, ..., 9: `per_class` requests of every digit."""
    return torch.arange(CLASSES).repeat_interleave(per_class)


@dataclass
class Result:
    setting: Setting
    accuracy: float        # the judge names the requested class this often
    samples: Tensor        # (10·per_class, 1, 8, 8), requested classes as in requested_classes()
    seconds: float


def evaluate(models: DigitModels, settings: Sequence[Setting] = DEFAULT_SETTINGS, per_class: int = 50,
             sampling: SampleConfig = SampleConfig(), seed: int = 0) -> list[Result]:
    """Generate `per_class` digits of every class under each setting (same starting noise) and judge them."""
    y = requested_classes(per_class)
    results = []
    for setting in settings:
        start = time.perf_counter()
        x = generate(guided(models, setting, y), len(y), models.schedule, sampling, seed)
        results.append(Result(setting, models.judge.accuracy(x, y), x, time.perf_counter() - start))
    return results


def real_accuracy(models: DigitModels) -> float:
    """The judge's accuracy on the held-out real digits."""
    return models.judge.accuracy(models.data.test_x, models.data.test_y)


def markdown_table(models: DigitModels, results: dict[str, Sequence[Result]]) -> str:
    """The table of docs/how-diffusion-works.md: how often the judge names the requested class, on real digits
    and on generated ones; one column per sampler (`results`: sampler name -> evaluate()'s results)."""
    names = list(results)
    rows = {}
    for name in names:
        for r in results[name]:
            rows.setdefault((r.setting, len(r.samples)), []).append(f"{100 * r.accuracy:.1f} %")
    real = [f"{100 * real_accuracy(models):.1f} %"] + ["" for _ in names[1:]]
    lines = ["| digits judged | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names),
             f"| real held-out digits ({len(models.data.test_y)}) | " + " | ".join(real) + " |"]
    for (setting, n), cells in rows.items():
        lines.append(f"| generated ({n}), {setting.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
