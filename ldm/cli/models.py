"""``ldm info`` and ``ldm convert``: what a model file is, and the same model in the other layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm import assets
from ldm.cli.options import UsageError, add_model_arguments, add_models_dir_argument, pipeline_from


def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="checkpoint file, model folder, or PNG (default: --model)")
    p.add_argument("--model", metavar="PATH", help="same as PATH (default: the shipped model)")
    p.add_argument("--hash", action="store_true", help="also print the weights' short sha256")
    add_models_dir_argument(p)


def info(args) -> int:
    from ldm.pipeline.png_info import read_png_info, weights_hash

    path = Path(args.path or args.model or _default_model_path())
    if not path.exists():
        path = _named_model(str(path), args.models_dir, f"{str(path)!r} does not exist")
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


def _named_model(name: str, models_dir, missing: str) -> Path:
    """A library checkpoint or a cached Hugging Face repo id (``ldm.checkpoints.library``); ``missing`` otherwise."""
    from ldm.checkpoints.library import is_repo_id, open_library, resolve_model

    library = open_library(models_dir)
    if library is None and not is_repo_id(name):
        raise UsageError(missing)
    return resolve_model(name, library)


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
        src = _named_model(str(src), args.models_dir, f"source {str(src)!r} does not exist")
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
