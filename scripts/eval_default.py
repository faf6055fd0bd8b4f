"""Does the model draw the emoji it is asked for? Top-1/top-5 of the emoji judge on generated images (issue 6).

    PYTHONPATH=. python scripts/eval_default.py --model runs/default/unet/model
    PYTHONPATH=. python scripts/eval_default.py --model DIR --data /work/data/emoji --captions 200 \\
        --guidance 1 2 3 5 7 --judge runs/emoji_judge.safetensors --out docs/eval_default.json

The judge (scripts/emoji_judge.py) is a small CNN trained on the real single-emoji pictures; it is trained on
first use and cached at ``--judge``. ``--captions`` concepts are drawn once (seeded, stratified over the
Unicode categories in proportion to their sizes) and each gets one caption in a form the training data uses
("a turtle"; ``--caption-form``). Every setting draws one image per caption, and caption i always starts from
seed ``--seed`` + i, so the rows differ only in what they are meant to compare. Rows:

  * real images: the dataset's own pictures of the chosen concepts (both styles) — the judge's ceiling;
  * real images, VAE round trip: the same pictures encoded and decoded by the model's VAE — the ceiling for a
    generator that must go through that VAE;
  * untrained model: the same architecture with the U-Net and the text encoder freshly initialised (their own
    initialisation, as ``ldm train`` starts from scratch, seeded by ``--seed``) and the model's trained VAE kept,
    sampled at the model's default guidance — what the text-to-image training added;
  * the model at each guidance scale of ``--guidance`` (1 = the conditional branch alone, no guidance).

Chance is 1/K and 5/K for K concepts. Generation is batched (``--batch`` prompts per call) with ldm's
batch-invariant mode off, for speed: the images are the same for the same ``--batch``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emoji_judge import EmojiSet, Judge, JudgeError, load_emoji, obtain, to_model_input, topk_shares  # noqa: E402
from emoji_judge import validity_lines  # noqa: E402

CAPTION_FORMS = ("article", "name", "emoji")


class EvalError(ValueError):
    """A usage error: the message names the path or value at fault."""


# ---------------------------------------------------------------------------------------------- what to ask for
def select_concepts(categories: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """``n`` concept indices, stratified: each category gets its share of ``n`` in proportion to its size (largest
    remainders round), drawn at random within it (seeded); returned in index order."""
    if not 0 < n <= len(categories):
        raise EvalError(f"--captions {n}: choose between 1 and {len(categories)} concepts (the dataset has "
                        f"{len(categories)})")
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        groups.setdefault(c, []).append(i)
    names = sorted(groups)
    exact = {c: n * len(groups[c]) / len(categories) for c in names}
    share = {c: int(exact[c]) for c in names}
    for c in sorted(names, key=lambda c: (share[c] - exact[c], c))[: n - sum(share.values())]:
        share[c] += 1
    rng = random.Random(seed)
    return sorted(i for c in names for i in rng.sample(groups[c], share[c]))


def caption_for(concept: str, captions: Sequence[str], form: str = "article") -> str:
    """A caption of the training data for ``concept``: "article" ("a turtle"; the bare name for mass nouns such
    as "sushi"), "name" (the CLDR name, "turtle") or "emoji" ("a turtle emoji")."""
    if form not in CAPTION_FORMS:
        raise EvalError(f"--caption-form {form!r}: use one of {CAPTION_FORMS}")
    if form == "article":
        plain = [c for c in captions if c != concept and "emoji" not in c and "," not in c]
        return plain[0] if plain else concept
    if form == "emoji":
        return next((c for c in captions if c.endswith(" emoji") and not c.startswith("an emoji of")), concept)
    return concept


# ---------------------------------------------------------------------------------------------- generation
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, guidance: float, steps: int | None = None,
             sampler: str | None = None, batch: int = 32, desc: str = "generate") -> torch.Tensor:
    """One image per prompt (seed i for prompt i), ``batch`` prompts per pipeline call -> (N, 3, H, W) in [-1, 1]."""
    from tqdm.auto import tqdm

    sampler = sampler or pipe.defaults.get("sampler", "dpmpp_2m")
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="img") as bar:
        for i in range(0, len(prompts), batch):
            unit = pipe(list(prompts[i:i + batch]), seed=[int(s) for s in seeds[i:i + batch]], steps=steps,
                        guidance=guidance, sampler=sampler, output_type="np", progress=False)
            out.append(to_model_input(unit))
            bar.update(len(unit))
    return torch.cat(out)


def vae_round_trip(pipe, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] encoded to latents and decoded again by the pipeline's VAE."""
    out = [pipe.decode_latents(pipe.encode_images(images[i:i + batch])).clamp(-1, 1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def untrained(pipe, seed: int = 0):
    """A Pipeline of the same architecture whose U-Net and text encoder are freshly initialised (the trained VAE,
    schedule and tokenizer kept)."""
    from ldm import Pipeline
    from ldm.models.text import TextEncoder
    from ldm.models.unet import UNet

    torch.manual_seed(seed)
    unet = UNet(pipe.unet.config)
    text = TextEncoder(pipe.text_encoder.config, tokenizer=pipe.text_encoder.tokenizer)
    fresh = dataclasses.replace(pipe.components, unet=unet, text_encoder=text)
    out = Pipeline(fresh, device=pipe.device, dtype=pipe.dtype)
    out.batch_invariant = pipe.batch_invariant
    return out


# ---------------------------------------------------------------------------------------------- scoring
def row(name: str, judge: Judge, images: torch.Tensor, labels: torch.Tensor, categories: Sequence[str],
        **extra) -> dict:
    """Top-1/top-5 of ``images`` against ``labels``, overall and top-1 per category of the requested concept."""
    ranks = judge.ranks(images, labels)
    cats = [categories[int(y)] for y in labels]
    per = {c: topk_shares(ranks[torch.tensor([k == c for k in cats])], (1,))["top1"] for c in sorted(set(cats))}
    return {"name": name, **extra, "images": len(labels), **topk_shares(ranks), "top1_by_category": per}


def markdown(result: dict) -> str:
    """The table of the model card: one line per row, plus chance."""
    s = result["settings"]
    lines = [f"{len(result['captions'])} captions ({s['caption_form']} form, e.g. "
             f"{result['captions'][0]['caption']!r}), {s['sampler']}, {s['steps']} steps; judged top-1 / top-5 "
             f"among {result['concepts_total']} concepts", "",
             "| images | n | top-1 | top-5 |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['images']} | {r['top1']:.1%} | {r['top5']:.1%} |")
    k = result["concepts_total"]
    lines.append(f"| chance (1/{k}, 5/{k}) | | {1 / k:.1%} | {5 / k:.1%} |")
    return "\n".join(lines)


def evaluate(a: argparse.Namespace, log=print) -> dict:
    from ldm import Pipeline

    for path, what in ((a.model, "model"), (a.data, "data")):
        if not Path(path).exists():
            raise EvalError(f"--{what} {path} does not exist")
    data: EmojiSet = load_emoji(a.data)
    chosen = select_concepts(data.categories, a.captions, a.seed)
    prompts = [caption_for(data.concepts[i], data.captions.get(data.concepts[i], []), a.caption_form)
               for i in chosen]
    labels = torch.tensor(chosen)
    seeds = [a.seed + i for i in range(len(chosen))]
    judge = obtain(a.judge, data, None, check=not a.skip_judge_validation, log=log)
    pipe = Pipeline.from_pretrained(a.model, device=a.device)
    pipe.batch_invariant = False
    settings = {"steps": a.steps or pipe.defaults["steps"], "sampler": a.sampler or pipe.defaults.get(
        "sampler", "dpmpp_2m"), "batch": a.batch, "seed": a.seed, "caption_form": a.caption_form}
    gen = dict(steps=settings["steps"], sampler=settings["sampler"], batch=a.batch)
    start, rows = time.perf_counter(), []

    real = torch.isin(data.labels, labels)
    rows.append(row("real images (both styles)", judge, data.images[real], data.labels[real], data.categories,
                    kind="real"))
    rows.append(row("real images, VAE round trip", judge, vae_round_trip(pipe, data.images[real]),
                    data.labels[real], data.categories, kind="vae"))
    default_guidance = float(pipe.defaults["guidance"])
    images = generate(untrained(pipe, a.seed), prompts, seeds, guidance=default_guidance, desc="untrained", **gen)
    rows.append(row(f"untrained model, guidance {default_guidance:g}", judge, images, labels, data.categories,
                    kind="untrained", guidance=default_guidance))
    for g in a.guidance:
        images = generate(pipe, prompts, seeds, guidance=g, desc=f"guidance {g:g}", **gen)
        name = f"model, guidance {g:g}" + (" (no guidance)" if g == 1 else "")
        rows.append(row(name, judge, images, labels, data.categories, kind="model", guidance=g))
    return {"model": str(a.model), "data": str(a.data), "concepts_total": len(data.concepts),
            "captions": [{"concept": data.concepts[i], "caption": p, "category": data.categories[i], "seed": s}
                         for i, p, s in zip(chosen, prompts, seeds)],
            "settings": settings, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
            "judge": {"path": str(a.judge) if a.judge else None, "config": dataclasses.asdict(judge.config),
                      **judge.info}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model folder (or file) Pipeline.from_pretrained loads")
    p.add_argument("--data", type=Path, default=Path("/work/data/emoji"), help="emoji dataset folder")
    p.add_argument("--captions", type=int, default=200, help="how many concepts (one caption each) to generate")
    p.add_argument("--caption-form", choices=CAPTION_FORMS, default="article",
                   help="article: 'a turtle'; name: 'turtle'; emoji: 'a turtle emoji'")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.0],
                   help="classifier-free guidance scales to sweep")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; none: the model's own")
    p.add_argument("--sampler", default=None, help="sampler name; none: the model's own, else dpmpp_2m")
    p.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="seeds the concept choice, the noise and the untrained model")
    p.add_argument("--judge", type=Path, default=Path("runs/emoji_judge.safetensors"),
                   help="judge file (scripts/emoji_judge.py): reused if made from --data, else trained and saved")
    p.add_argument("--skip-judge-validation", action="store_true",
                   help="do not train the two cross-style judges that measure the judge's validity")
    p.add_argument("--device", default=None, help="torch device; none: the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads; none: torch's choice")
    p.add_argument("--out", type=Path, default=Path("docs/eval_default.json"), help="JSON results file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.batch < 1:
            raise EvalError(f"--batch {a.batch}: must be at least 1")
        result = evaluate(a)
    except (EvalError, JudgeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(markdown(result))
    judge = result["judge"]
    print("\n".join(validity_lines(judge, judge["config"]["steps"], result["concepts_total"])))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
