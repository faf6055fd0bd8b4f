"""Derive the bundled CLIP tokenizer files (vocab.json, merges.txt) from open_clip's BPE file.

Run once; the outputs ship in ``ldm/assets/tokenizer/`` so that ldm tokenizes offline:

    python scripts/make_tokenizer_assets.py [--bpe PATH] [--out DIR]

The BPE file is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, see LICENSE-CLIP.txt), which the
``open_clip_torch`` package bundles. The vocabulary is built the way CLIP's ``SimpleTokenizer`` builds it
(Radford et al. 2021, github.com/openai/CLIP ``clip/simple_tokenizer.py``): the 256 byte symbols, the same
symbols with the end-of-word marker ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``
-- 49,408 ids in all. ``merges.txt`` is the Hugging Face format: a ``#version`` line, then one merge per line.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# CLIP uses the first 49152 - 256 - 2 merges of the file (after its header line), leaving room in the
# 49,408-entry vocabulary for the 2 x 256 byte symbols and the two special tokens.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """The symbols of GPT-2's reversible byte -> printable-unicode map (Radford et al. 2019), in table order.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes (controls, space, ...) are moved to
    code points 256, 257, ... so that no symbol is whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    points = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            points.append(256 + extra)
            extra += 1
    return [chr(p) for p in points]


def build(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {NUM_MERGES} merges of two symbols each")
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_path}: the merges produce duplicate tokens")
    return vocab, merges


def main() -> None:
    import open_clip.tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, default=Path(open_clip.tokenizer.default_bpe()))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "ldm/assets/tokenizer")
    args = parser.parse_args()
    vocab, merges = build(args.bpe)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
