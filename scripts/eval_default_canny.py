"""Does the default model's canny ControlNet make the drawings follow the edges? Edge agreement with and without it.

    PYTHONPATH=. python scripts/eval_default_canny.py                     # the shipped ldm/assets/default-canny
    PYTHONPATH=. python scripts/eval_default_canny.py --control runs/default-canny/controlnet \\
        --out docs/eval_default_canny.json --sheet docs/images/default-canny.png

Three groups of control images, each drawn by the default model with the ControlNet (``--scale``) and without it,
from the same seed (image i: ``--seed`` + i):

  * own: canny edges of ``--n`` single-emoji pictures of the dataset, prompted with their own caption ("a crown");
  * swap: the same edge maps prompted with another concept's caption (the edges and the prompt disagree);
  * drawn: simple outlines drawn here (circle, square, triangle, star, ...) that no training image has.

Agreement: the canny edges of the output (the same detector and thresholds) against the control's edges, with a
tolerance of ``--tolerance`` pixels (each map dilated by a (2t+1)² square before counting the other's pixels in it):
precision = share of output edge pixels near a control edge, recall = share of control edge pixels near an output
edge, F1 their harmonic mean (0 when an image has no edges). The uncontrolled row is the chance level: where the
model draws anyway (emoji are centred), it agrees without being told.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm.pipeline.preprocess import canny
from ldm.train.data import load_rgb

SIZE = 64
DRAWN = [("a red apple", "circle"), ("a gift", "square"), ("a pizza", "triangle"), ("a star", "star"),
         ("a basketball", "circles"), ("a diamond", "diamond"), ("a rocket", "cross"), ("a watermelon", "ring")]


def drawn_outline(shape: str, size: int = SIZE) -> Image.Image:
    """White 1-pixel outlines on black, as canny draws them."""
    im = Image.new("RGB", (size, size))
    d, m, c, w = ImageDraw.Draw(im), size // 6, size // 2, (255, 255, 255)
    if shape == "circle":
        d.ellipse((m, m, size - m, size - m), outline=w)
    elif shape == "square":
        d.rectangle((m, m, size - m, size - m), outline=w)
    elif shape == "triangle":
        d.polygon([(c, m), (size - m, size - m), (m, size - m)], outline=w)
    elif shape == "star":
        points = [(c + (size / 2 - m) * (1 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                   c - (size / 2 - m) * (1 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(points, outline=w)
    elif shape == "circles":
        d.ellipse((4, 16, 30, 42), outline=w)
        d.ellipse((34, 22, 60, 48), outline=w)
    elif shape == "diamond":
        d.polygon([(c, m), (size - m, c), (c, size - m), (m, c)], outline=w)
    elif shape == "cross":
        a, b = c - 7, c + 7
        d.polygon([(a, m), (b, m), (b, a), (size - m, a), (size - m, b), (b, b), (b, size - m), (a, size - m),
                   (a, b), (m, b), (m, a), (a, a)], outline=w)
    elif shape == "ring":
        d.ellipse((m, m, size - m, size - m), outline=w)
        d.ellipse((c - 10, c - 10, c + 10, c + 10), outline=w)
    return im


def edge_map(image: Image.Image) -> np.ndarray:
    """Boolean edges: canny of a picture, or the white pixels of a control image."""
    return np.asarray(image.convert("L")) > 127


def agreement(output: Image.Image, control: Image.Image, tolerance: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of the output's canny edges against the control's edges, within ``tolerance`` px."""
    import cv2

    out, ctl = edge_map(canny(output)), edge_map(control)
    kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
    near_ctl = cv2.dilate(ctl.astype(np.uint8), kernel) > 0
    near_out = cv2.dilate(out.astype(np.uint8), kernel) > 0
    precision = float((out & near_ctl).sum() / out.sum()) if out.any() else 0.0
    recall = float((ctl & near_out).sum() / ctl.sum()) if ctl.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def cases(data: Path, n: int, seed: int) -> dict[str, list[tuple[str, Image.Image]]]:
    """(prompt, control image) per group."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    singles = [r for r in rows if r.get("kind") == "single"]
    chosen = random.Random(seed).sample(singles, n)
    edges = [canny(load_rgb(data / r["file_name"])) for r in chosen]
    prompts = [r["captions"][1] for r in chosen]     # "a crown": the "a NAME" form of the training captions
    swapped = prompts[n // 2:] + prompts[:n // 2]
    return {"own": list(zip(prompts, edges)), "swap": list(zip(swapped, edges)),
            "drawn": [(prompt, drawn_outline(shape)) for prompt, shape in DRAWN]}


def sheet(groups: dict, columns: int, tile: int = 128) -> Image.Image:
    """Per group three rows (control, with the ControlNet, without), ``columns`` cases each, a gap between groups."""
    gap = tile // 4
    height = len(groups) * 3 * tile + (len(groups) - 1) * gap
    out = Image.new("RGB", (columns * tile, height), (236, 236, 236))
    y = 0
    for rows in groups.values():
        for row in zip(*[(c, a, b) for c, a, b in rows[:columns]]):
            for x, im in enumerate(row):
                out.paste(im.resize((tile, tile), Image.Resampling.NEAREST), (x * tile, y))
            y += tile
        y += gap
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--control", default="default-canny", help="the ControlNet (default: the shipped one)")
    p.add_argument("--data", type=Path, default=Path("/work/data/emoji"), help="the emoji dataset folder")
    p.add_argument("--n", type=int, default=16, help="dataset edge maps (groups own and swap)")
    p.add_argument("--scale", type=float, default=1.0, help="the ControlNet's weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=int, default=1, help="pixels an edge may be off and still agree")
    p.add_argument("--out", type=Path, help="write the figures here (JSON)")
    p.add_argument("--sheet", type=Path, help="write a contact sheet here (PNG)")
    args = p.parse_args(argv)

    from ldm import Control, Pipeline

    pipe = Pipeline()
    unit = pipe.load_control(args.control)
    results, shown = {}, {}
    for group, items in cases(args.data, args.n, args.seed).items():
        scores, shown[group] = {"controlled": [], "uncontrolled": []}, []
        for i, (prompt, control) in enumerate(items):
            with_cn = pipe(prompt, control=Control(unit, control, args.scale), seed=args.seed + i, progress=False)[0]
            without = pipe(prompt, seed=args.seed + i, progress=False)[0]
            scores["controlled"].append(agreement(with_cn, control, args.tolerance))
            scores["uncontrolled"].append(agreement(without, control, args.tolerance))
            shown[group].append((control, with_cn, without))
        summary = {k: {m: round(float(np.mean([s[m] for s in v])), 3) for m in ("precision", "recall", "f1")}
                   for k, v in scores.items()}
        wins = sum(a["f1"] > b["f1"] for a, b in zip(scores["controlled"], scores["uncontrolled"]))
        results[group] = {"cases": len(items), **summary, "controlled_f1_higher": wins}
        print(f"{group:6s} n={len(items):2d}  F1 with {summary['controlled']['f1']:.3f}  without "
              f"{summary['uncontrolled']['f1']:.3f}  (higher with: {wins}/{len(items)})", flush=True)
    report = {"control": str(args.control), "scale": args.scale, "tolerance_px": args.tolerance, "seed": args.seed,
              "groups": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.sheet:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet(shown, 8).save(args.sheet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
