"""``ldm info`` and ``ldm convert``: what a model file is, and the same model in the other layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm import assets
from ldm.cli.options import UsageError, add_model_arguments, pipeline_from


def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="checkpoint file, model folder, or PNG (default: --model)")
    p.add_argument("--model", metavar="PATH", help="same as PATH (default: the shipped model)")
    p.add_argument("--hash", action="store_true", help="also print the weights' short sha256")


def info(args) -> int:
    from ldm.pipeline.png_info import read_png_info, weights_hash

    path = Path(args.path or args.model or _default_model_path())
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    if path.is_file() and path.suffix.lower() == ".png":
        recorded = read_png_info(path)
        print(recorded.to_parameters())
        return 0
    from ldm.checkpoints import describe

    print(describe(path))
    if args.hash:
        print(f"hash  {weights_hash(path)}")
    return 0


def _default_model_path() -> Path:
    return assets.DEFAULT_MODEL


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
    from ldm.checkpoints import save_diffusers, save_single_file

    pipe = pipeline_from(argparse.Namespace(model=str(src), device=args.device, dtype=args.dtype))
    if dst.suffix.lower() == ".safetensors":
        save_single_file(pipe.components, dst)
    elif dst.suffix:
        raise UsageError(f"DST {str(dst)!r}: use a .safetensors file name or a folder name without a suffix")
    else:
        save_diffusers(pipe.components, dst)
    print(dst)
    return 0
