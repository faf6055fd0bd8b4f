"""``ldm generate``: images from a prompt, from an image (img2img, inpainting), or again from a PNG's settings."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

from ldm import assets
from ldm.cli.control_options import add_control_arguments, check_control_arguments, control_units
from ldm.cli.options import (UsageError, add_model_arguments, add_prompt_arguments, add_vae_argument, image_side,
                             number, pipeline_from, positive_int, seed_int)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s PROMPT [-o FILE] [options]    or    %(prog)s --from-png FILE [options]"
    # the usage line names PROMPT (optional with --from-png): no "positional arguments" section for it
    p.add_argument("prompt", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default: from prompt and seed)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--seed", type=seed_int, metavar="N", help="seed of the first image (default: random)")
    p.add_argument("--steps", type=positive_int, metavar="N")
    p.add_argument("--guidance", type=number, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--sampler", metavar="NAME", help="dpmpp_2m (default), ddim, euler_a, lcm, unipc, ...")
    p.add_argument("--spacing", metavar="S", help="trailing, karras, lcm, ays, ... (docs/samplers.md)")
    p.add_argument("--height", type=image_side, metavar="H")
    p.add_argument("--width", type=image_side, metavar="W")
    p.add_argument("--num", type=positive_int, default=None, metavar="N", help="number of images (-o FILE gives FILE-0.png, ...)")
    p.add_argument("--eta", type=number, metavar="X", help="stochasticity of ddim-like samplers (tcd: its gamma)")
    p.add_argument("--clip-skip", type=positive_int, metavar="N")
    p.add_argument("--from-png", metavar="FILE", help="take the settings stored in an ldm/A1111 PNG")
    p.add_argument("--image", metavar="FILE", help="start from this image (img2img; with --mask: inpaint)")
    p.add_argument("--mask", metavar="FILE", help="inpainting mask, white = repaint")
    p.add_argument("--strength", type=number, metavar="S", help="img2img/inpaint strength in [0, 1]")
    p.add_argument("--vae-tiling", action="store_true", help="decode big images tile by tile (bounded memory)")
    add_control_arguments(p)
    add_model_arguments(p)
    add_vae_argument(p)
    add_prompt_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


_FROM_PNG = {"prompt": "prompt", "negative": "negative_prompt", "seed": "seed", "steps": "steps",
             "guidance": "guidance", "sampler": "sampler", "spacing": "spacing", "height": "height",
             "width": "width", "eta": "eta", "clip_skip": "clip_skip", "dtype": "dtype"}


def generate(args) -> int:
    from ldm.pipeline.png_info import read_png_info, save_png
    from ldm.samplers import get_sampler

    recorded = read_png_info(args.from_png) if args.from_png else None
    if recorded is not None:
        _fill_from_png(args, recorded)
    if args.prompt is None:
        raise UsageError("give a PROMPT (or --from-png FILE)")
    if args.mask and not args.image:
        raise UsageError("--mask needs --image (the picture to inpaint)")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    if args.sampler:
        get_sampler(args.sampler)  # unknown names fail here, before the model loads
    outputs = _output_paths(args)
    check_control_arguments(args, recorded)   # control files and images (a PNG's units too), before the model loads
    if args.image:  # check the inputs before the model loads
        from ldm.pipeline.images import load_image, load_mask

        source = load_image(args.image)
        if args.mask:
            load_mask(args.mask, source.size)

    pipe = pipeline_from(args)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if recorded is not None and recorded.model_hash and pipe.model_hash and recorded.model_hash != pipe.model_hash:
        warnings.warn(f"{args.from_png} was made with model hash {recorded.model_hash} but this model's is "
                      f"{pipe.model_hash}; the image will differ (pass --model)")
    if recorded is not None and (recorded.vae or recorded.vae_hash) and not args.vae:
        warnings.warn(f"{args.from_png} was decoded with the VAE {recorded.vae or recorded.vae_hash!r}; the image "
                      "will differ (pass --vae PATH)")
    options = dict(negative_prompt=args.negative, steps=args.steps, guidance=args.guidance,
                   sampler=args.sampler or pipe.defaults.get("sampler", "dpmpp_2m"), seed=args.seed,
                   num_images_per_prompt=args.num or 1, eta=args.eta or 0.0, clip_skip=args.clip_skip,
                   spacing=args.spacing or pipe.defaults.get("spacing"), progress=not args.quiet,
                   height=args.height, width=args.width)
    if args.control:
        options["control"] = control_units(pipe, args)
    strength = {} if args.strength is None else {"strength": args.strength}
    if args.image and args.mask:
        images = pipe.inpaint(args.prompt, args.image, args.mask, **strength, **options)
    elif args.image:
        images = pipe.img2img(args.prompt, args.image, **strength, **options)
    else:
        images = pipe(args.prompt, **options)
    for image, path in zip(images, outputs or _default_paths(args.prompt, images)):
        print(save_png(image, path))
    return 0


def _fill_from_png(args, recorded) -> None:
    """Settings from the PNG for every flag the user did not give (flags on the command line win)."""
    mode = recorded.extra.get("mode", "txt2img")
    if mode != "txt2img" and not args.image:
        raise UsageError(f"{args.from_png} was made by {mode}; pass --image (and --mask) to redo it")
    for flag, key in _FROM_PNG.items():
        value = getattr(recorded, key)
        if getattr(args, flag) is None and value not in (None, ""):
            setattr(args, flag, value)
    if args.strength is None and recorded.extra.get("strength") is not None:
        args.strength = float(recorded.extra["strength"])
    if args.model is None:
        args.model = _recorded_model(args.from_png, recorded, args.models_dir)


def _recorded_model(png: str, recorded, models_dir=None) -> str | None:
    """The model a PNG names, when it can be found without ``--model``: the shipped default (by its hash or
    name), a path that exists (PNGs from ldm before 0.2 stored one), or the models folder's checkpoint with that
    short hash, else that name. Anything else needs ``--model``."""
    from ldm.checkpoints.library import open_library
    from ldm.pipeline.png_info import weights_hash

    if recorded.model is None and recorded.model_hash is None:
        return None
    if recorded.model_hash == weights_hash(assets.DEFAULT_MODEL) or (
            recorded.model_hash is None and recorded.model == assets.DEFAULT_MODEL_NAME):
        return None
    if recorded.model and Path(recorded.model).exists():
        return recorded.model
    library = open_library(models_dir)
    for key in (recorded.model_hash, recorded.model) if library is not None else ():
        entry = library.lookup("checkpoint", key) if key else None
        if entry is not None:
            return str(entry.path)
    hash_note = f" (hash {recorded.model_hash})" if recorded.model_hash else ""
    raise UsageError(f"{png} was made with model {recorded.model or 'unnamed'!r}{hash_note}, not the shipped "
                     "default; pass --model PATH to that model")


def _output_paths(args) -> list[Path] | None:
    if args.output is None:
        return None
    path = Path(args.output)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output {args.output!r} must end in .png (the settings are stored as PNG text)")
    if path.is_dir():
        raise UsageError(f"--output {args.output!r} is a folder; give a file name ending in .png")
    if not path.parent.exists():
        raise UsageError(f"--output folder {str(path.parent)!r} does not exist")
    n = args.num or 1
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _default_paths(prompt: str, images) -> list[Path]:
    """``a-turtle-playing-basketball-42.png``: the prompt made file-name safe, then the image's seed."""
    from ldm.pipeline.png_info import JSON_KEY, GenerationInfo

    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:60] or "image"
    seeds = [GenerationInfo.from_dict(json.loads(image.info[JSON_KEY])).seed for image in images]
    return [Path(f"{slug}-{seed}.png") for seed in seeds]
