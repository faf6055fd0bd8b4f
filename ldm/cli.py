"""The ``ldm`` command line: ``ldm generate | batch | train | convert | info | visualize``.

Commands are a registry (``COMMANDS``): each names a function that adds its arguments to an argparse parser and
a function that runs the parsed arguments. Only the chosen command's module is imported, so ``ldm --help`` is
instant. Another module adds a command by adding one ``Command`` line here; ``add_model_arguments`` and
``load_pipeline`` give it the shared ``--model / --device / --dtype`` flags.

Errors in what the user typed (bad flag values, unreadable files, sizes, unknown names) end the process with
exit status 2 and ONE line on stderr, never a traceback (set LDM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    add_arguments: str  # "module:function", called with the subcommand's ArgumentParser
    run: str  # "module:function", called with the parsed Namespace; returns an exit status or None


COMMANDS = [
    Command("generate", "draw images from a prompt (or redo one from its PNG)",
            "ldm.cli:generate_arguments", "ldm.cli:generate"),
    Command("batch", "draw images for every line of a prompt file (resumable)",
            "ldm.batch:add_arguments", "ldm.batch:run"),
    Command("train", "train or fine-tune a model on captioned images",
            "ldm.train:add_arguments", "ldm.train:run"),
    Command("convert", "convert a model: SD single file <-> diffusers folder",
            "ldm.cli:convert_arguments", "ldm.cli:convert"),
    Command("info", "describe a checkpoint, or print the settings stored in an image",
            "ldm.cli:info_arguments", "ldm.cli:info"),
    Command("visualize", "draw the forward/reverse diffusion figure",
            "ldm.cli:visualize_arguments", "ldm.cli:visualize"),
]
USAGE_ERRORS = (ValueError, OSError, ImportError)  # CheckpointError and bad-input errors are ValueErrors


class UsageError(Exception):
    """Raised by a command for a bad combination of arguments; reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # only --help/--version come before it
    chosen = next((c for c in COMMANDS if c.name == first), None)
    parser = Parser(prog="ldm", description="Latent text-to-image diffusion.",
                    epilog="`ldm COMMAND --help` shows a command's options.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.summary, description=command.summary)
        if command is chosen:
            _resolve(command.add_arguments, command.name)(sub)
    args = parser.parse_args(argv)
    if chosen is None:
        parser.error(f"choose a command: {', '.join(c.name for c in COMMANDS)}")
    prog = f"ldm {chosen.name}"
    with _one_line_warnings():
        try:
            status = _resolve(chosen.run, chosen.name)(args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except (UsageError, *USAGE_ERRORS) as e:
            if os.environ.get("LDM_DEBUG"):
                raise
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 1
    return int(status or 0)


def _resolve(target: str, command: str):
    module, _, function = target.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"ldm {command}: error: this command is not available in this installation ({e})")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError('x')) is "'x'"
        text = f"missing key {text}"
    return text


@contextlib.contextmanager
def _one_line_warnings():
    """Show Python warnings as ``ldm: warning: ...`` (one line, no source excerpt) while a command runs."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ldm: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# ---------------------------------------------------------------------- shared flags
def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--model", metavar="PATH", help="SD .safetensors/.ckpt file or diffusers folder "
                        "(default: the shipped model)")
    parser.add_argument("--device", metavar="D", help="cpu (default), cuda, cuda:N, mps")
    if dtype:
        parser.add_argument("--dtype", metavar="T", help="float32 (default), float16, bfloat16")


def load_pipeline(args, **kwargs):
    """The Pipeline for ``--model/--device/--dtype`` (names are checked before any weights load)."""
    from .devices import resolve_device, resolve_dtype
    from .pipeline import Pipeline

    resolve_device(args.device), resolve_dtype(getattr(args, "dtype", None))
    if args.model is None:
        return Pipeline(device=args.device, dtype=getattr(args, "dtype", None), **kwargs)
    return Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(args, "dtype", None), **kwargs)


def _parsed(text: str, kind, label: str = ""):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{label}{text!r} is not {'an integer' if kind is int else 'a number'}") \
            from None


def positive_int(text: str) -> int:
    value = _parsed(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def seed_int(text: str) -> int:
    value = _parsed(text, int, "seed ")
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed {value} is outside [0, 2**64)")
    return value


def image_side(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (try {max(8, value // 8 * 8)})")
    return value


def number(text: str) -> float:
    value = _parsed(text, float)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# ---------------------------------------------------------------------- ldm generate
def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s PROMPT [-o FILE] [options]    or    %(prog)s --from-png FILE [options]"
    p.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write; with --num N: FILE-0.png ... "
                   "(default: a name made from the prompt and seed)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--seed", type=seed_int, metavar="N", help="seed of the first image (default: random)")
    p.add_argument("--steps", type=positive_int, metavar="N")
    p.add_argument("--guidance", type=number, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--sampler", metavar="NAME", help="dpmpp_2m (or the model's choice), ddim, euler, euler_a, ...")
    p.add_argument("--spacing", metavar="S", help="leading, trailing, linspace, karras, exponential")
    p.add_argument("--height", type=image_side, metavar="H")
    p.add_argument("--width", type=image_side, metavar="W")
    p.add_argument("--num", type=positive_int, default=None, metavar="N", help="number of images")
    p.add_argument("--eta", type=number, metavar="X", help="stochasticity of ddim-like samplers")
    p.add_argument("--clip-skip", type=positive_int, metavar="N")
    p.add_argument("--from-png", metavar="FILE", help="take the settings stored in an ldm/A1111 PNG")
    p.add_argument("--image", metavar="FILE", help="start from this image (img2img; with --mask: inpaint)")
    p.add_argument("--mask", metavar="FILE", help="inpainting mask, white = repaint")
    p.add_argument("--strength", type=number, metavar="S", help="img2img/inpaint strength in [0, 1]")
    add_model_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


_FROM_PNG = {"prompt": "prompt", "negative": "negative_prompt", "seed": "seed", "steps": "steps",
             "guidance": "guidance", "sampler": "sampler", "spacing": "spacing", "height": "height",
             "width": "width", "eta": "eta", "clip_skip": "clip_skip", "dtype": "dtype"}


def generate(args) -> int:
    from .png_info import read_png_info, save_png
    from .samplers import get_sampler

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
    if args.image:  # check the inputs before the model loads
        from .images import load_image, load_mask

        source = load_image(args.image)
        if args.mask:
            load_mask(args.mask, source.size)

    pipe = load_pipeline(args)
    if recorded is not None and recorded.model_hash and pipe.model_hash and recorded.model_hash != pipe.model_hash:
        warnings.warn(f"{args.from_png} was made with model hash {recorded.model_hash} but this model's is "
                      f"{pipe.model_hash}; the image will differ (pass --model)")
    options = dict(negative_prompt=args.negative, steps=args.steps, guidance=args.guidance,
                   sampler=args.sampler or pipe.defaults.get("sampler", "dpmpp_2m"), seed=args.seed,
                   num_images_per_prompt=args.num or 1, eta=args.eta or 0.0, clip_skip=args.clip_skip,
                   spacing=args.spacing or pipe.defaults.get("spacing"), progress=not args.quiet,
                   height=args.height, width=args.width)
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
    if args.model is None and recorded.model and Path(recorded.model).exists():
        args.model = recorded.model


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
    from .png_info import JSON_KEY, GenerationInfo

    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:60] or "image"
    seeds = [GenerationInfo.from_dict(json.loads(image.info[JSON_KEY])).seed for image in images]
    return [Path(f"{slug}-{seed}.png") for seed in seeds]


# ---------------------------------------------------------------------- ldm info
def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="checkpoint file, model folder, or PNG (default: --model)")
    p.add_argument("--model", metavar="PATH", help="same as PATH (default: the shipped model)")
    p.add_argument("--hash", action="store_true", help="also print the weights' short sha256")


def info(args) -> int:
    from .png_info import read_png_info, weights_hash

    path = Path(args.path or args.model or _default_model_path())
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    if path.is_file() and path.suffix.lower() == ".png":
        recorded = read_png_info(path)
        print(recorded.to_parameters())
        return 0
    from .checkpoints import describe

    print(describe(path))
    if args.hash:
        print(f"hash  {weights_hash(path)}")
    return 0


def _default_model_path() -> Path:
    from .pipeline import DEFAULT_MODEL

    return DEFAULT_MODEL


# ---------------------------------------------------------------------- ldm convert
def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="SRC DST", help="model to read (default --model) and where to "
                   "write it: a .safetensors file (SD single file) or a folder (diffusers layout)")
    add_model_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def convert(args) -> int:
    if len(args.paths) > 2:
        raise UsageError(f"convert takes SRC DST, got {len(args.paths)} paths")
    if len(args.paths) == 2 and args.model:
        raise UsageError("give the source either as SRC or as --model, not both")
    src = Path(args.paths[0]) if len(args.paths) == 2 else Path(args.model or _default_model_path())
    dst = Path(args.paths[-1])
    if not src.exists():
        raise UsageError(f"source {str(src)!r} does not exist")
    if dst.exists() and not args.overwrite and (dst.is_file() or any(dst.iterdir())):
        raise UsageError(f"{str(dst)!r} exists; pass --overwrite to replace it")
    from .checkpoints import save_diffusers, save_single_file

    pipe = load_pipeline(argparse.Namespace(model=str(src), device=args.device, dtype=args.dtype))
    if dst.suffix.lower() == ".safetensors":
        save_single_file(pipe.components, dst)
    elif dst.suffix:
        raise UsageError(f"DST {str(dst)!r}: use a .safetensors file name or a folder name without a suffix")
    else:
        save_diffusers(pipe.components, dst)
    print(dst)
    return 0


# ---------------------------------------------------------------------- ldm visualize
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
    from .samplers import get_sampler
    from .visualize import pipeline_figure

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
        from .images import load_image

        load_image(args.image)
    pipe = load_pipeline(args)
    figure = pipeline_figure(pipe, args.prompt, args.image, timesteps=timesteps, guidance=args.guidance,
                             sampler=args.sampler, steps=args.steps, seed=args.seed)
    figure.save(args.output)
    print(args.output)
    return 0
