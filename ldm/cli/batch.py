"""``ldm batch PROMPT_FILE --out DIR``: the flags of a batch run; the run itself is ``ldm.batch``."""

from __future__ import annotations

import argparse
import dataclasses

from ldm.batch import DEFAULT_BATCH_SIZE, FORMATS, GRID, BatchOptions, run_batch
from ldm.cli.options import (add_model_arguments, add_prompt_arguments, add_vae_argument, image_side, number,
                             positive_int, seed_int)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s PROMPT_FILE --out DIR [options]    (the same command again resumes)"
    p.add_argument("prompt_file", metavar="PROMPT_FILE", help=".txt, .jsonl or .csv file, or - for stdin")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs, manifest.jsonl, batch.json")
    p.add_argument("--format", choices=FORMATS, help="prompt file format (default: from the suffix)")
    p.add_argument("--seed", type=seed_int, default=0, metavar="N",
                   help="base seed for lines without their own (default 0)")
    p.add_argument("--num", "--images", dest="num", type=positive_int, default=1, metavar="N",
                   help="images per line (seeds s, s+1, ...); under torchrun write --images (it takes --num for "
                        "its own --numa-binding)")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt for lines without their own")
    p.add_argument("--steps", type=positive_int, metavar="N")
    p.add_argument("--guidance", type=number, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--sampler", default="dpmpp_2m", metavar="NAME")
    p.add_argument("--height", type=image_side, metavar="H")
    p.add_argument("--width", type=image_side, metavar="W")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--skip-invalid", action="store_true", help="leave out bad lines with a warning")
    p.add_argument("--overwrite", action="store_true", help="start the folder's batch over")
    p.add_argument("--grid", action="store_true", help=f"also write a contact sheet, DIR/{GRID}")
    p.add_argument("--vae-tiling", action="store_true", help="decode big images tile by tile (bounded memory)")
    add_model_arguments(p)
    add_vae_argument(p)
    add_prompt_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    options = BatchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BatchOptions)})
    for name in ("lora_dir", "embeddings_dir", "no_emphasis", "strict"):   # the prompt flags, read by run_batch
        setattr(options, name, getattr(args, name))
    return run_batch(options)
