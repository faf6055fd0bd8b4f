#!/usr/bin/env python3
"""Build the emoji dataset ldm's default model is trained on (docs/dataset.md).

Reads the Noto ("google") and Twemoji ("twitter") 64x64 PNGs and the emoji index from the npm packages
emoji-datasource-google / -twitter, the CLDR short names from unicode-emoji-json, and writes an HF
imagefolder: DIR/images/*.png (64x64 RGB on white), DIR/metadata.jsonl, DIR/concepts.json, DIR/README.txt.
The folder is built next to DIR and renamed into place when complete; a second run with the same inputs and
options does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from emoji_captions import GAMES, Emoji, can_play, pair_captions, single_captions

REPO = Path(__file__).resolve().parents[1]
LICENSES = REPO / "ldm" / "assets" / "licenses"
CODE = [Path(__file__).resolve(), Path(__file__).resolve().with_name("emoji_captions.py")]  # in the build stamp

STYLES = {"google": ("emoji-datasource-google", "16.0.0"), "twitter": ("emoji-datasource-twitter", "16.0.0")}
NAMES = ("unicode-emoji-json", "0.9.0")  # pinned: `npm view unicode-emoji-json version` on 2026-11-22

# --categories keys -> emoji-datasource category (= Unicode emoji group). "Flags" and "Component" are never
# offered: flags are excluded from the dataset and components are not pictures of anything.
CATEGORY_KEYS = {
    "animals": "Animals & Nature", "food": "Food & Drink", "activities": "Activities",
    "travel": "Travel & Places", "objects": "Objects", "smileys": "Smileys & Emotion",
    "people": "People & Body", "symbols": "Symbols",
}
DEFAULT_KEYS = ("animals", "food", "activities", "travel", "objects")
EXCLUDED_SUBCATEGORIES = {"keycap", "flag", "country-flag", "subdivision-flag"}
JAPANESE_BUTTON = re.compile(r"^Japanese “.+” button$")

SIZE = 64  # output image side; the source PNGs are 64x64 RGBA
WHITE = (255, 255, 255)


class PrepareError(Exception):
    """A problem the user can fix (missing npm, bad tarball, ...); printed without a traceback."""


# ---------------------------------------------------------------------------------------------- fetching
def tarball_name(package: str, version: str) -> str:
    return f"{package}-{version}.tgz"  # what `npm pack` writes for an unscoped package


def fetch(cache: Path, log) -> dict[str, Path]:
    """Tarballs of the three packages, from the cache or downloaded with `npm pack` (never installed)."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {key: (pkg, ver) for key, (pkg, ver) in STYLES.items()} | {"names": NAMES}
    paths = {key: cache / tarball_name(pkg, ver) for key, (pkg, ver) in wanted.items()}
    missing = [key for key, p in paths.items() if not p.is_file()]
    for key in wanted:
        if key not in missing:
            log(f"  cached   {paths[key]}")
    if not missing:
        return paths
    specs = [f"{wanted[k][0]}@{wanted[k][1]}" for k in missing]
    npm = shutil.which("npm")
    if npm is None:
        raise PrepareError(
            "npm was not found on PATH. Install Node.js/npm (https://nodejs.org), or put these tarballs in "
            f"{cache}: " + ", ".join(paths[k].name for k in missing)
            + f"  (on another machine: npm pack {' '.join(specs)})")
    for key, spec in zip(missing, specs):
        log(f"  npm pack {spec} -> {cache}")
        proc = subprocess.run([npm, "pack", spec], cwd=cache, capture_output=True, text=True)
        if proc.returncode != 0 or not paths[key].is_file():
            paths[key].unlink(missing_ok=True)
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise PrepareError(
                f"`npm pack {spec}` failed (exit {proc.returncode}): {' / '.join(detail) or 'no output'}. "
                f"Check the network / npm registry settings, or put {paths[key].name} in {cache}.")
    return paths


def read_tarball(path: Path, keep) -> dict[str, bytes]:
    """Member name -> bytes for the regular files whose name passes keep(name), in one pass over the gzip."""
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    out[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise PrepareError(f"{path} is not a readable npm tarball ({err}); delete it and run again") from err
    return out


def load_json(files: dict[str, bytes], name: str, tarball: Path):
    if name not in files:
        raise PrepareError(f"{tarball} has no {name}; is it the right package?")
    try:
        return json.loads(files[name])
    except json.JSONDecodeError as err:
        raise PrepareError(f"{tarball}: {name} is not valid JSON ({err})") from err


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- selection
def parse_categories(text: str) -> list[str]:
    """'default,smileys' -> category names. Keys: default, all, or those of CATEGORY_KEYS."""
    keys: list[str] = []
    for raw in filter(None, (t.strip().lower() for t in text.split(","))):
        if raw == "default":
            keys += DEFAULT_KEYS
        elif raw == "all":
            keys += CATEGORY_KEYS
        elif raw in CATEGORY_KEYS:
            keys.append(raw)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown category {raw!r}; use default, all or any of {', '.join(CATEGORY_KEYS)}")
    if not keys:
        raise argparse.ArgumentTypeError("--categories is empty")
    return [CATEGORY_KEYS[k] for k in dict.fromkeys(keys)]


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def excluded(category: str, subcategory: str, name: str) -> bool:
    """Flags, keycaps and the Japanese “…” button signs are never in the dataset."""
    return category == "Flags" or subcategory in EXCLUDED_SUBCATEGORIES or bool(JAPANESE_BUTTON.match(name))


def select(index: list[dict], names: dict[str, dict], images: dict[str, set[str]], categories: list[str],
           max_version: str | None, log) -> list[Emoji]:
    """Join emoji-datasource's index with unicode-emoji-json's names; keep emoji both styles have."""
    chosen, no_name, no_image = [], [], []
    for entry in index:
        if entry.get("category") not in categories:
            continue
        char = "".join(chr(int(cp, 16)) for cp in entry["unified"].split("-"))
        info = names.get(char)
        if info is None:
            no_name.append(entry.get("short_name", entry["unified"]))
            continue
        if excluded(entry["category"], entry.get("subcategory", ""), info["name"]):
            continue
        if max_version and version_tuple(entry.get("added_in", "0")) > version_tuple(max_version):
            continue
        # Skin-tone variants live under entry["skin_variations"]; only the base image is used.
        if not all(entry.get(f"has_img_{s}") and entry["image"] in files for s, files in images.items()):
            no_image.append(info["name"])
            continue
        chosen.append(Emoji(info["name"], info["slug"], char, entry["category"], entry.get("subcategory", ""),
                            entry["image"], entry.get("added_in", "")))
    if no_name:
        log(f"  skipped {len(no_name)} emoji unknown to {NAMES[0]}: {', '.join(no_name[:8])}")
    if no_image:
        log(f"  skipped {len(no_image)} emoji without an image in every style: {', '.join(no_image[:8])}")
    slugs = [e.slug for e in chosen]
    if len(set(slugs)) != len(slugs):
        raise PrepareError(f"{NAMES[0]} gives two emoji the same slug; cannot name the image files")
    return chosen


# ---------------------------------------------------------------------------------------------- images
def decode(data: bytes, what: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as err:  # PIL raises several types for a broken file
        raise PrepareError(f"cannot decode {what}: {err}") from err
    return im.convert("RGBA")


def fit(im: Image.Image, side: int) -> Image.Image:
    """Scale an RGBA image so its longer side is `side`. PIL resamples RGBA in premultiplied alpha."""
    scale = side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)


def on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite over opaque white: out = a·c + (1 − a)·255 (Porter & Duff 1984, 'over')."""
    canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def single_image(sprite: Image.Image) -> Image.Image:
    canvas = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    small = fit(sprite, SIZE)
    canvas.alpha_composite(small, ((SIZE - small.width) // 2, (SIZE - small.height) // 2))
    return on_white(canvas)


def pair_image(left: Image.Image, right: Image.Image, rng: random.Random) -> Image.Image:
    """Two emoji side by side, each about one half (30-36 px, so they may overlap a little), jittered."""
    canvas = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    a, b = fit(left, rng.randint(30, 36)), fit(right, rng.randint(30, 36))
    canvas.alpha_composite(b, (SIZE - b.width - rng.randint(0, 2), (SIZE - b.height) // 2 + rng.randint(-4, 4)))
    canvas.alpha_composite(a, (rng.randint(0, 2), (SIZE - a.height) // 2 + rng.randint(-4, 4)))
    return on_white(canvas)


def choose_pairs(emoji: list[Emoji], n: int, rng: random.Random) -> list[tuple[str, Emoji, Emoji]]:
    """n distinct (style, left, right); about 1 in 8 is a player with a game or instrument, the rest uniform."""
    if n and len(emoji) < 2:
        raise PrepareError("--pairs needs at least two emoji in the selected categories")
    players = [e for e in emoji if can_play(e)]
    played = [e for e in emoji if e.concept in GAMES or e.subcategory == "musical-instrument"]
    limit = len(STYLES) * len(emoji) * (len(emoji) - 1)
    seen: set[tuple[str, str, str]] = set()
    out = []
    while len(out) < min(n, limit):
        if players and played and rng.random() < 0.125:
            left, right = rng.choice(players), rng.choice(played)
        else:
            left, right = rng.sample(emoji, 2)
        key = (rng.choice(sorted(STYLES)), left.slug, right.slug)
        if left.slug != right.slug and key not in seen:
            seen.add(key)
            out.append((key[0], left, right))
    return out


# ---------------------------------------------------------------------------------------------- output
def write_dataset(tmp: Path, emoji: list[Emoji], sprites: dict[str, dict[str, bytes]], n_pairs: int, seed: int,
                  stamp: dict, log) -> dict:
    (tmp / "images").mkdir()
    decoded = {s: {} for s in STYLES}

    def sprite(style: str, e: Emoji) -> Image.Image:
        if e.image not in decoded[style]:
            decoded[style][e.image] = decode(sprites[style][e.image], f"img/{style}/64/{e.image}")
        return decoded[style][e.image]

    records = []
    for style in sorted(STYLES):
        for e in emoji:
            name = f"images/{style}_{e.slug}.png"
            single_image(sprite(style, e)).save(tmp / name, optimize=True)
            caps = single_captions(e.concept, style)
            records.append({"file_name": name, "text": e.concept, "captions": caps, "concept": e.concept,
                            "style": style, "category": e.category, "kind": "single"})
        log(f"  {style}: {len(emoji)} images")
    rng = random.Random(seed)
    pairs = choose_pairs(emoji, n_pairs, rng)
    for i, (style, left, right) in enumerate(pairs):
        name = f"images/pair_{style}_{left.slug}__{right.slug}.png"
        pair_image(sprite(style, left), sprite(style, right), rng).save(tmp / name, optimize=True)
        caps = pair_captions(left, right, style)
        records.append({"file_name": name, "text": caps[0], "captions": caps,
                        "concept": f"{left.concept} and {right.concept}", "concepts": [left.concept, right.concept],
                        "style": style, "category": "pair", "categories": [left.category, right.category],
                        "kind": "pair"})
        if (i + 1) % 1000 == 0 or i + 1 == len(pairs):
            log(f"  pairs: {i + 1}/{len(pairs)}")
    with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    concepts = [{"concept": e.concept, "category": e.category, "subcategory": e.subcategory, "emoji": e.char,
                 "slug": e.slug} for e in emoji]
    (tmp / "concepts.json").write_text(json.dumps(concepts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    counts = {"concepts": len(emoji), "images_per_style": len(emoji), "pairs": len(pairs), "records": len(records)}
    if LICENSES.is_dir():
        shutil.copytree(LICENSES, tmp / "licenses")
    (tmp / "README.txt").write_text(readme(stamp, counts), encoding="utf-8")
    (tmp / "build.json").write_text(json.dumps({"stamp": stamp, "counts": counts}, indent=1) + "\n")
    return counts


def readme(stamp: dict, counts: dict) -> str:
    pk = stamp["packages"]
    lines = [
        "ldm emoji dataset (generated by scripts/prepare_emoji.py; see docs/dataset.md in ldm)",
        "",
        f"{counts['concepts']} concepts x {len(STYLES)} styles = {2 * counts['images_per_style']} single-emoji "
        f"images, plus {counts['pairs']} two-emoji compositions; {counts['records']} records in metadata.jsonl.",
        f"Categories: {', '.join(stamp['categories'])}. Flags, keycaps, Japanese “…” button signs and "
        "skin-tone variants are excluded.",
        "",
        "Sources (npm tarballs, sha256):",
        *(f"  {k}: {v['package']}@{v['version']}  {v['sha256']}" for k, v in pk.items()),
        "",
        "Licences (full texts in licenses/):",
        "  google images:  Noto Emoji, Copyright Google LLC, Apache License 2.0",
        "  twitter images: Twemoji, Copyright (c) 2018 Twitter, Inc and other contributors, CC-BY 4.0",
        "                  https://creativecommons.org/licenses/by/4.0/",
        "  names/groups:   unicode-emoji-json (MIT), from Unicode CLDR data (Unicode License v3)",
        "  emoji index:    emoji-datasource (MIT)",
        "Changes: composited on white, saved as 64x64 RGB; compositions scale two emoji to 30-36 px.",
        "The Apple and Facebook sets of emoji-datasource are not used.",
        "",
    ]
    return "\n".join(lines)


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; the old one (if any) disappears only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def contact_sheet(data: Path, dest: Path, cols: int = 8, rows: int = 6, seed: int = 0) -> Path:
    """A PNG grid of dataset images (shown at 2x) with their first caption under each tile."""
    from PIL import ImageDraw, ImageFont

    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    singles = [r for r in records if r["kind"] == "single"]
    pairs = [r for r in records if r["kind"] == "pair"]
    rng = random.Random(seed)
    n_pairs = min(len(pairs), cols * rows // 4)
    chosen = rng.sample(singles, min(len(singles), cols * rows - n_pairs)) + rng.sample(pairs, n_pairs)
    tile, text_h = 2 * SIZE, 30
    sheet = Image.new("RGB", (cols * (tile + 8) + 8, rows * (tile + text_h + 8) + 8), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, r in enumerate(chosen):
        x, y = 8 + (i % cols) * (tile + 8), 8 + (i // cols) * (tile + text_h + 8)
        sheet.paste(Image.open(data / r["file_name"]).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        caps = r["captions"]
        shown = caps[1] if r["kind"] == "single" else next((c for c in caps if " playing " in c), caps[0])
        words, lines = f"{shown} [{r['style'][0]}]".split(), [""]
        for w in words:  # greedy wrap to the tile width, two lines at most
            trial = f"{lines[-1]} {w}".strip()
            if draw.textlength(trial, font=font) <= tile or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(w)
        draw.multiline_text((x, y + tile + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest, optimize=True)
    return dest


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/work/data/emoji"), help="dataset folder to write")
    p.add_argument("--cache", type=Path, default=Path("/work/cache/npm"), help="folder for the npm tarballs")
    p.add_argument("--categories", type=parse_categories, default="default",
                   help=f"comma-separated: default ({','.join(DEFAULT_KEYS)}), all, or any of "
                        f"{','.join(CATEGORY_KEYS)}")
    p.add_argument("--pairs", type=int, default=3000, help="number of two-emoji compositions")
    p.add_argument("--seed", type=int, default=0, help="seed for the compositions")
    p.add_argument("--max-version", default=None, help="keep only emoji added in this emoji version or earlier")
    p.add_argument("--force", action="store_true", help="rebuild even if --out is up to date or foreign")
    p.add_argument("--contact-sheet", type=Path, default=None, help="also write a PNG grid of samples here")
    p.add_argument("--quiet", action="store_true", help="print only errors and the summary")
    return p


def run(args: argparse.Namespace) -> dict:
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.pairs < 0:
        raise PrepareError(f"--pairs must be >= 0, got {args.pairs}")
    if args.max_version is not None and not re.fullmatch(r"\d+(\.\d+)*", args.max_version):
        raise PrepareError(f"--max-version must look like 15.0, got {args.max_version!r}")
    start = time.time()
    log("[1/4] packages")
    tarballs = fetch(args.cache, log)
    packages = {"google": STYLES["google"], "twitter": STYLES["twitter"], "names": NAMES}
    code = hashlib.sha256(b"".join(p.read_bytes() for p in CODE)).hexdigest()[:16]
    stamp = {"code": code, "categories": args.categories, "pairs": args.pairs, "seed": args.seed,
             "max_version": args.max_version,
             "packages": {k: {"package": packages[k][0], "version": packages[k][1], "sha256": sha256(p)}
                          for k, p in tarballs.items()}}
    out: Path = args.out
    build = out / "build.json"
    if out.exists() and not args.force:
        if not build.is_file():
            raise PrepareError(f"{out} exists and was not made by this script (no build.json); "
                               "pass --force to replace it or choose another --out")
        try:
            previous = json.loads(build.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}  # an unreadable stamp only means "rebuild"
        if previous.get("stamp") == stamp:
            log(f"{out} is up to date (same packages and options); nothing to do")
            return previous["counts"] | {"seconds": round(time.time() - start, 1), "skipped": True}

    log("[2/4] reading tarballs")
    sprites, index = {}, None
    for style in sorted(STYLES):
        prefix = f"package/img/{style}/64/"
        files = read_tarball(tarballs[style], lambda n, pre=prefix: n.startswith(pre) or n == "package/emoji.json")
        index = load_json(files, "package/emoji.json", tarballs[style]) if index is None else index
        sprites[style] = {n[len(prefix):]: b for n, b in files.items() if n.startswith(prefix)}
        log(f"  {style}: {len(sprites[style])} PNGs")
    names = load_json(read_tarball(tarballs["names"], lambda n: n == "package/data-by-emoji.json"),
                      "package/data-by-emoji.json", tarballs["names"])

    log("[3/4] selecting emoji")
    emoji = select(index, names, {s: set(f) for s, f in sprites.items()}, args.categories, args.max_version, log)
    if not emoji:
        raise PrepareError(f"no emoji left in categories {args.categories}")
    log(f"  {len(emoji)} concepts in {', '.join(args.categories)}")

    log(f"[4/4] writing {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        counts = write_dataset(tmp, emoji, sprites, args.pairs, args.seed, stamp, log)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts | {"seconds": round(time.time() - start, 1), "skipped": False}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = run(args)
        if args.contact_sheet is not None:
            print(f"contact sheet: {contact_sheet(args.out, args.contact_sheet)}")
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {counts['concepts']} concepts, {counts['images_per_style']} images per style "
          f"({', '.join(sorted(STYLES))}), {counts['pairs']} pairs, {counts['records']} records "
          f"in {counts['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
