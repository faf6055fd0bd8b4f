"""Package a trained model folder as ldm's shipped default model: fp16 safetensors, no tokenizer copy.

    python scripts/export_default.py runs/default/unet/model ldm/assets/default
    python scripts/export_default.py SRC DST --max-mb 40 --overwrite

The weights are stored in float16 (the Pipeline computes in float32 on the CPU: loading casts them up). The
tokenizer is not copied: a folder without `tokenizer/` gets ldm's bundled CLIP BPE tokenizer
(ldm/assets/tokenizer), and the script checks that the source folder's tokenizer gives the same ids on a set of
probe prompts before leaving it out, so the exported model reads prompts exactly as in training. It then loads
the export back and compares one U-Net and text-encoder output with the source (fp16 rounding only), and fails
if the folder is over the size budget. The copy is written next to DST and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run as a script from a checkout

PROBES = ["a turtle playing basketball", "red apple", "an emoji of a rocket", "pizza, google style",
          "a cat face and a basketball", "", "ünïcödé and numbers 123 😀"]


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def check_tokenizer(source, exported) -> None:
    """The export (bundled tokenizer, the family's padding) must turn prompts into the same padded ids as the
    source folder's own tokenizer; otherwise dropping the tokenizer would change what the model reads."""
    for prompt in PROBES:
        ours, theirs = source.text_encoder.tokenize(prompt), exported.text_encoder.tokenize(prompt)
        if not torch.equal(ours, theirs):
            raise SystemExit(f"export_default: ldm's bundled tokenizer reads {prompt!r} differently from the "
                             "model's own; it cannot ship without its tokenizer folder")


@torch.no_grad()
def max_relative_difference(a, b) -> dict[str, float]:
    """U-Net and text-encoder outputs of two Components on one fixed input, as max |a−b| / max |a|."""
    gen = torch.Generator().manual_seed(0)
    cfg = a.unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    out = {}
    ctx_a, ctx_b = a.text_encoder(["a turtle"]), b.text_encoder(["a turtle"])
    out["text_encoder"] = float((ctx_a - ctx_b).abs().max() / ctx_a.abs().max())
    ua, ub = a.unet(x, torch.tensor([500]), ctx_a), b.unet(x, torch.tensor([500]), ctx_a)
    out["unet"] = float((ua - ub).abs().max() / ua.abs().max())
    return out


def export(src: Path, dst: Path, max_mb: float, overwrite: bool) -> float:
    from ldm.checkpoints import load, save_diffusers

    if not (src / "model_index.json").is_file():
        raise SystemExit(f"export_default: {src} is not a model folder (no model_index.json); train it first "
                         "with scripts/train_default.sh")
    if dst.exists() and not overwrite:
        raise SystemExit(f"export_default: {dst} exists; pass --overwrite to replace it")
    components = load(src)
    half = copy.deepcopy(components)
    for module in (half.unet, half.vae, half.text_encoder):
        module.half()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        save_diffusers(half, tmp)
        shutil.rmtree(tmp / "tokenizer")
        size = folder_mb(tmp)
        if size > max_mb:
            raise SystemExit(f"export_default: the export is {size:.1f} MB, over the {max_mb:g} MB budget")
        exported = load(tmp)
        check_tokenizer(components, exported)
        diffs = max_relative_difference(components, exported)
        if max(diffs.values()) > 1e-2:
            raise SystemExit(f"export_default: the fp16 export differs from the source by {diffs}")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{dst}: {size:.1f} MB; fp16 vs source, max relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="trained model folder (OUT/unet/model of scripts/train_default.sh)")
    p.add_argument("dst", type=Path, help="where to write the export (the shipped one: ldm/assets/default)")
    p.add_argument("--max-mb", type=float, default=40.0, help="size budget in MB (default 40)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    export(args.src, args.dst, args.max_mb, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
