"""The control flags of ``ldm generate``: ``--control`` units, ``--control-dir``, ``--ip-encoder``, and redrawing
the units a PNG records (``--from-png`` with ``--control-image``). Unit specs: ``ldm.batch.control_units``."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ldm.cli.options import UsageError


def unit_arg(value: str):
    """argparse type of ``--control``: MODEL:IMAGE[:WEIGHT[:START[:END]]][:KEY=VALUE ...]."""
    from ldm.batch.control_units import parse_unit

    try:
        return parse_unit(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--control: ")) from None


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", action="append", type=unit_arg, metavar="SPEC",
                   help="MODEL:IMAGE[:WEIGHT[:START[:END]]][:module=canny]")
    p.add_argument("--control-dir", metavar="DIR", help="where control names resolve")
    p.add_argument("--control-image", action="append", metavar="FILE",
                   help="--from-png: a recorded unit's image")
    p.add_argument("--ip-encoder", metavar="DIR", help="an IP-Adapter's image encoder")
    p.add_argument("--depth-model", metavar="DIR", help="module=depth: a transformers depth model")


def _files(args):
    from ldm.batch.control_units import ControlFiles

    try:
        return ControlFiles(args.control_dir)
    except ValueError as e:
        raise UsageError(f"--control-dir: {e}") from None


def check_control_arguments(args, recorded=None) -> None:
    """Before the model loads: the PNG's recorded units taken over (when no --control is given), every unit's
    model found and image readable; one UsageError naming what is missing."""
    from ldm.checkpoints.library import open_library
    from ldm.batch.control_units import units_from_info
    from ldm.pipeline.images import load_image

    if args.depth_model:   # the depth module's model folder (ldm.pipeline.preprocess.depth)
        from ldm.pipeline.preprocess import DEPTH_ENV

        os.environ[DEPTH_ENV] = args.depth_model
    files = _files(args)
    try:
        recorded_units = units_from_info(recorded.extra) if recorded is not None and not args.control else []
    except ValueError as e:   # e.g. an A1111 module ldm does not have
        raise UsageError(f"{args.from_png}: {e} (give --control MODEL:IMAGE to draw with your own control image)") \
            from None
    if args.control_image and not recorded_units:
        raise UsageError("--control-image goes with --from-png of an image that records ControlNet units (or use "
                         "--control MODEL:IMAGE)")
    if recorded_units:
        images = args.control_image or []
        if len(images) != len(recorded_units):
            names = ", ".join(f"ControlNet {i}: {u.model} ({u.module})" for i, u in enumerate(recorded_units))
            raise UsageError(f"{args.from_png} records {len(recorded_units)} control unit(s) [{names}]; pass "
                             f"--control-image FILE for each, in order (got {len(images)}), or --control to "
                             "replace them")
        args.control = [dataclasses.replace(u, image=image) for u, image in zip(recorded_units, images)]
    library = open_library(getattr(args, "models_dir", None))
    for i, spec in enumerate(args.control or ()):
        where = f"--from-png ControlNet {i}" if recorded_units else "--control"
        try:
            files.resolve(spec.model, f"{where} model", library)
        except ValueError as e:
            raise UsageError(str(e)) from None
        load_image(spec.image, f"{where} image")


def control_units(pipe, args) -> list:
    """The Controls of ``args.control`` for ``pipe`` (each model loaded once)."""
    from ldm.batch.control_units import UnitLoader

    try:
        return UnitLoader(pipe, _files(args), args.ip_encoder).controls(args.control, where="--control")
    except ValueError as e:
        raise UsageError(str(e)) from None
