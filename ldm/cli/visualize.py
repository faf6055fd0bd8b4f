"""``ldm visualize``: the forward/reverse diffusion figure for a prompt (and optionally an image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli.options import UsageError, add_model_arguments, number, pipeline_from, positive_int, seed_int


def visualize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what the reverse process should draw")
    p.add_argument("-o", "--output", metavar="FILE", default="diffusion.png", help="PNG (default diffusion.png)")
    p.add_argument("--image", metavar="FILE", help="image to noise in the forward row (default: drawn first)")
    p.add_argument("--t", metavar="T,T,...", default="0,100,250,500,750,999", help="timesteps to show")
    p.add_argument("--seed", type=seed_int, default=0, metavar="N")
    p.add_argument("--steps", type=positive_int, default=50, metavar="N", help="sampler steps in all")
    p.add_argument("--sampler", default="euler", metavar="NAME")
    p.add_argument("--guidance", type=number, metavar="G")
    add_model_arguments(p)


def visualize(args) -> int:
    from ldm.samplers import get_sampler
    from ldm.pipeline.visualize import pipeline_figure

    try:
        timesteps = [int(t) for t in args.t.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--t must be comma-separated integers, got {args.t!r}") from None
    if not timesteps:
        raise UsageError("--t names no timesteps")
    get_sampler(args.sampler)
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"--output {args.output!r} must end in .png")
    if args.image:
        from ldm.pipeline.images import load_image

        load_image(args.image)
    pipe = pipeline_from(args)
    figure = pipeline_figure(pipe, args.prompt, args.image, timesteps=timesteps, guidance=args.guidance,
                             sampler=args.sampler, steps=args.steps, seed=args.seed)
    figure.save(args.output)
    print(args.output)
    return 0
