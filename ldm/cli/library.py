"""``ldm models``: the model library of a models folder (A1111 / ComfyUI / ldm layout) as one table."""

from __future__ import annotations

import argparse

from ldm.cli.options import UsageError, add_models_dir_argument

KIND_CHOICES = ("checkpoint", "lora", "vae", "controlnet", "embedding")   # ldm.checkpoints.library.KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_models_dir_argument(p)
    p.add_argument("--kind", choices=KIND_CHOICES, help="list one kind only")
    p.add_argument("--hash", action="store_true",
                   help="compute the short hashes not cached yet (reads every file in full: slow for big models)")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    from ldm.checkpoints.library import open_library

    library = open_library(args.models_dir)
    if library is None:
        raise UsageError("give --models-dir DIR (or set LDM_MODELS_DIR): an A1111, ComfyUI or ldm models folder")
    entries = library.of(args.kind) if args.kind else library.entries
    rows = [("KIND", "FAMILY", "SIZE", "HASH", "NAME")]
    missing = 0
    for e in entries:
        digest = e.hash() if args.hash and not e.problem else e.known_hash
        missing += digest is None and not e.problem
        rows.append((e.kind, "broken" if e.problem else e.family or "-", _size(e.size), digest or "-",
                     e.name + (f"  ({e.problem})" if e.problem else "")))   # the name last: it may hold spaces
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    folders = sorted({f.relative_to(library.root).as_posix() for kind in ([args.kind] if args.kind else KIND_CHOICES)
                      for f in library.folders(kind)})
    print(f"\n{len(entries)} entries in {library.root}: {', '.join(folders) or 'no model folders found'}")
    if missing:
        print(f"{missing} hashes not computed yet: ldm models --hash")
    return 0
