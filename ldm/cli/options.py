"""What every ``ldm`` command shares: the usage error, the ``--model / --device / --dtype`` flags, and argparse
types that check a value where it is typed (a size that is not a multiple of 8, a negative seed, ...)."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Raised by a command for a bad combination of arguments; reported as one line, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--model", metavar="PATH", help="file, folder, library name or HF repo ORG/NAME")
    add_models_dir_argument(parser)
    parser.add_argument("--device", metavar="D", help="cpu (default), cuda, cuda:N, mps")
    if dtype:
        # "auto" is how to turn speed on (README): bf16 on CPUs with AMX or AVX-512 BF16, fp16 on CUDA
        parser.add_argument("--dtype", metavar="T", help="auto (fast: bf16 CPU, fp16 CUDA), float32 (default)")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default=None, metavar="B",
                        help="auto (OpenVINO if installed), torch, openvino")


def add_models_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", metavar="DIR", help="A1111/ComfyUI/ldm models folder ($LDM_MODELS_DIR)")


def add_vae_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", metavar="PATH", help="an SD/SDXL VAE file or folder, or TAESD, to swap in")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """A1111's prompt habits (docs/adapters.md): <lora:NAME:W> tags, an embeddings folder, emphasis syntax."""
    parser.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:W> tags find NAME.safetensors")
    parser.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion files, each used by its stem")
    parser.add_argument("--no-emphasis", action="store_true", help="read (x:1.2), [x], BREAK literally")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="unmatched LoRA key: error (or warning)")


def prompt_options(args) -> dict:
    """Pipeline keyword arguments from :func:`add_prompt_arguments`' flags (none if the command has none)."""
    if not hasattr(args, "no_emphasis"):
        return {}
    return {"emphasis": not args.no_emphasis, "lora_dir": args.lora_dir, "embeddings_dir": args.embeddings_dir,
            "lora_strict": args.strict}


def pipeline_from(args, **kwargs):
    """The Pipeline for ``--model/--device/--dtype`` (names are checked before any weights load), with the
    ``--vae`` of commands that take one swapped in."""
    from ldm.pipeline import load_pipeline  # only the commands that draw pay for importing torch

    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(args, "dtype", None),
                         backend=getattr(args, "backend", None), models_dir=getattr(args, "models_dir", None),
                         **prompt_options(args), **kwargs)
    return pipe.load_vae(args.vae) if getattr(args, "vae", None) else pipe


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
