"""The handwritten-digits worked example: train a small pixel-space diffusion model and measure guidance.

    python scripts/example_digits.py --out docs

trains on scikit-learn's 8×8 digits (no download) a class-conditional denoiser and a noisy-digit classifier,
then writes OUT/digits_forward_reverse.png (the forward and reverse processes), OUT/digits_denoising.png (the
sample and the network's guess of the clean digit, step by step) and OUT/digits_samples.png (samples per class:
real, unconditional, classifier-free guidance, classifier guidance), and prints the judge's accuracy table in
Markdown.  docs/how-diffusion-works.md explains every step; the library code is in ldm/examples/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ldm.examples.digits import DigitsConfig, threads
from ldm.examples.digits_eval import (DEFAULT_SETTINGS, SampleConfig, Setting, evaluate, markdown_table,
                                      requested_classes, train_all)
from ldm.examples.digits_figures import denoising_figure, forward_reverse, samples_figure
from ldm.samplers import SAMPLERS


def parse_args(argv=None) -> argparse.Namespace:
    defaults, sampling = DigitsConfig(), SampleConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder for the three PNGs (default: docs)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--denoiser-steps", type=int, default=defaults.denoiser_steps, help="training batches")
    p.add_argument("--classifier-steps", type=int, default=defaults.classifier_steps, help="training batches")
    p.add_argument("--per-class", type=int, default=100, help="generated digits per class and setting")
    p.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=[sampling.sampler, "euler_a"],
                   metavar="NAME", help="samplers to measure, one table column each; the first draws the figures "
                   f"(default: {sampling.sampler} euler_a; known: {', '.join(sorted(SAMPLERS))})")
    p.add_argument("--steps", type=int, default=sampling.steps, help="sampler steps")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the networks are tiny)")
    p.add_argument("-q", "--quiet", action="store_true", help="no training progress")
    args = p.parse_args(argv)
    for name in ("per_class", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.config = DigitsConfig(seed=args.seed, denoiser_steps=args.denoiser_steps,
                                   classifier_steps=args.classifier_steps)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    args.out.mkdir(parents=True, exist_ok=True)
    with threads(args.threads):
        models = train_all(args.config, log)
        results, sample_seconds = {}, {}
        for name in args.samplers:
            start = time.perf_counter()
            sampling = SampleConfig(name, args.steps)
            results[name] = evaluate(models, DEFAULT_SETTINGS, args.per_class, sampling, args.seed)
            sample_seconds[name] = time.perf_counter() - start
        first = SampleConfig(args.samplers[0], args.steps)
        figures = {"digits_forward_reverse.png": forward_reverse(models, sampling=first, seed=args.seed),
                   "digits_denoising.png": denoising_figure(models, sampling=first, seed=args.seed),
                   "digits_samples.png": samples_figure(_panels(models, results[first.sampler], args.per_class),
                                                        models.judge)}
        for name, image in figures.items():
            image.save(args.out / name)
    print(markdown_table(models, results))
    unguided = next(r for r in results[args.samplers[0]] if r.setting == Setting("unconditional"))
    verdicts = torch.bincount(models.judge.predict(unguided.samples), minlength=10).tolist()
    print(f"\nthe judge's verdicts on the unconditional digits ({args.samplers[0]}), digit 0..9: {verdicts}")
    training = ", ".join(f"{name} {models.seconds[name]:.0f} s (CPU {models.cpu_seconds[name]:.0f} s)"
                         for name in models.seconds)
    sampling_time = ", ".join(f"{name} {s:.0f} s" for name, s in sample_seconds.items())
    print(f"\ntraining: {training}\nsampling {len(DEFAULT_SETTINGS)} × {10 * args.per_class} digits, "
          f"{args.steps} steps: {sampling_time}; threads: {args.threads}")
    print("wrote " + ", ".join(str(args.out / name) for name in figures))
    return 0


def _panels(models, results, per_class: int):
    """The panels of digits_samples.png: real held-out digits, then unconditional, CFG and classifier guidance."""
    by_setting = {r.setting: r.samples for r in results}
    order = models.data.test_y.argsort(stable=True)
    y = requested_classes(per_class)
    return [("real (held out)", models.data.test_x[order], models.data.test_y[order]),
            ("unconditional", by_setting[Setting("unconditional")], y),
            ("classifier-free guidance, scale 3", by_setting[Setting("cfg", 3.0)], y),
            ("classifier guidance, scale 5", by_setting[Setting("classifier", 5.0)], y)]


if __name__ == "__main__":
    sys.exit(main())
