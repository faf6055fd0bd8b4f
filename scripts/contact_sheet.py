"""A labelled contact sheet of a text-to-image model: each prompt drawn with a few seeds, its text under the images.

    PYTHONPATH=. python scripts/contact_sheet.py --model runs/default/unet/model --out docs/default_contact_sheet.png
    PYTHONPATH=. python scripts/contact_sheet.py --model DIR --out sheet.png --seeds 0 1 2 --prompts my_prompts.txt

The built-in prompts (``DEFAULT_PROMPTS``) are the ones issue 6 asks for: common animals, foods and objects in
the caption form of the emoji training data ("a turtle"), a few two-thing compositions ("a turtle and a
basketball") and "a turtle playing basketball". A prompts file holds one prompt a line (blank lines and lines
starting with # are skipped). Any model folder works: images are drawn at the model's own size and enlarged by
an integer factor (nearest neighbour, so pixels stay visible) to at least 128 pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_default import generate  # noqa: E402

ANIMALS = ["a turtle", "a cat", "a dog face", "an elephant", "a penguin", "a frog", "a unicorn", "an octopus",
           "a lion", "a butterfly", "a snail", "a spouting whale"]
FOODS = ["a red apple", "a pizza", "a hamburger", "a banana", "a birthday cake", "a watermelon", "a doughnut",
         "a carrot", "a strawberry", "a taco"]
OBJECTS = ["a rocket", "a light bulb", "an umbrella", "a guitar", "a basketball", "an alarm clock", "a key",
           "a camera", "a bicycle", "a crown", "a teapot"]
COMPOSITIONS = ["a turtle and a basketball", "a cat and a pizza", "a penguin and a guitar", "a frog and a red apple",
                "a rocket and a crown", "a penguin playing the guitar", "a turtle playing basketball"]
DEFAULT_PROMPTS = ANIMALS + FOODS + OBJECTS + COMPOSITIONS
MIN_TILE = 128
BACKGROUND, INK, GAP, TEXT_LINES = (236, 236, 236), (20, 20, 20), 10, 2


class SheetError(ValueError):
    """Bad prompts file or option; the message names it."""


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and # comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SheetError(f"prompts file {path} holds no prompts")
    return prompts


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int = TEXT_LINES) -> str:
    """Greedy word wrap to ``width`` pixels, at most ``lines`` lines (the last one cut with an ellipsis)."""
    out = [""]
    for word in text.split():
        trial = f"{out[-1]} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not out[-1]:
            out[-1] = trial
        elif len(out) < lines:
            out.append(word)
        else:
            while out[-1] and draw.textlength(out[-1] + "…", font=font) > width:
                out[-1] = out[-1][:-1]
            out[-1] += "…"
            break
    return "\n".join(out)


def layout(images: Sequence[Image.Image], prompts: Sequence[str], per_prompt: int, cols: int,
           title: str | None = None, font_size: int = 15) -> Image.Image:
    """Grid of cells, ``cols`` a row; a cell is one prompt's ``per_prompt`` images side by side, the prompt under
    them. ``images`` is prompt-major: images[k * per_prompt + j] is prompt k, seed j."""
    if len(images) != len(prompts) * per_prompt:
        raise SheetError(f"{len(images)} images for {len(prompts)} prompts x {per_prompt} seeds")
    tile = images[0].width
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    cell_w, cell_h = per_prompt * tile + (per_prompt - 1) * 2, tile + TEXT_LINES * line_h + 4
    rows = -(-len(prompts) // cols)
    top = line_h + 2 * GAP if title else GAP
    sheet = Image.new("RGB", (cols * (cell_w + GAP) + GAP, top + rows * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((GAP, GAP), _wrap(draw, title, font, sheet.width - 2 * GAP, 1), fill=INK, font=font)
    for k, prompt in enumerate(prompts):
        x, y = GAP + (k % cols) * (cell_w + GAP), top + (k // cols) * (cell_h + GAP)
        for j in range(per_prompt):
            sheet.paste(images[k * per_prompt + j], (x + j * (tile + 2), y))
        draw.multiline_text((x, y + tile + 3), _wrap(draw, prompt, font, cell_w), fill=INK, font=font, spacing=3)
    return sheet


def contact_sheet(pipe, prompts: Sequence[str], seeds: Sequence[int], *, cols: int = 5, steps: int | None = None,
                  guidance: float | None = None, sampler: str | None = None, batch: int = 32,
                  title: str | None = None) -> Image.Image:
    """Generate every (prompt, seed) pair and lay them out (see ``layout``)."""
    if not prompts or not seeds:
        raise SheetError("need at least one prompt and one seed")
    if cols < 1:
        raise SheetError(f"--cols {cols}: must be at least 1")
    guidance = float(pipe.defaults["guidance"] if guidance is None else guidance)
    flat = [p for p in prompts for _ in seeds]
    x = generate(pipe, flat, [s for _ in prompts for s in seeds], guidance=guidance, steps=steps, sampler=sampler,
                 batch=batch, desc="contact sheet")
    unit = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    factor = max(1, -(-MIN_TILE // unit.shape[2]))
    images = [Image.fromarray(u).resize((u.shape[1] * factor, u.shape[0] * factor), Image.Resampling.NEAREST)
              for u in unit]
    return layout(images, prompts, len(seeds), cols, title)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model folder (or file) Pipeline.from_pretrained loads")
    p.add_argument("--out", type=Path, default=Path("docs/default_contact_sheet.png"), help="PNG to write")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one image per seed for every prompt")
    p.add_argument("--prompts", type=Path, default=None, help="prompts file; none: the built-in list")
    p.add_argument("--cols", type=int, default=5, help="prompts per row")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; none: the model's own")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale; none: the model's own")
    p.add_argument("--sampler", default=None, help="sampler name; none: the model's own, else dpmpp_2m")
    p.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    p.add_argument("--device", default=None, help="torch device; none: the CPU")
    a = p.parse_args(argv)
    try:
        from ldm import Pipeline

        prompts = read_prompts(a.prompts) if a.prompts else DEFAULT_PROMPTS
        if not a.model.exists():
            raise SheetError(f"--model {a.model} does not exist")
        pipe = Pipeline.from_pretrained(a.model, device=a.device)
        pipe.batch_invariant = False   # batched for speed; the images still depend only on (prompt, seed, --batch)
        steps = a.steps or pipe.defaults["steps"]
        guidance = pipe.defaults["guidance"] if a.guidance is None else a.guidance
        sampler = a.sampler or pipe.defaults.get("sampler", "dpmpp_2m")
        title = (f"{a.model} - {sampler}, {steps} steps, guidance {guidance:g}, "
                 f"seeds {' '.join(map(str, a.seeds))}")
        sheet = contact_sheet(pipe, prompts, a.seeds, cols=a.cols, steps=steps, guidance=guidance, sampler=sampler,
                              batch=a.batch, title=title)
    except ValueError as err:     # SheetError, and the pipeline's own checks of a bad model or option
        print(f"error: {err}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out, optimize=True)
    print(f"wrote {a.out} ({sheet.width}x{sheet.height}, {len(prompts)} prompts x {len(a.seeds)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
