"""The CLIP byte-pair tokenizer, bundled so that ldm tokenizes offline, and 77-token prompt encoding.

The vocabulary and merges in ``assets/tokenizer/`` are OpenAI CLIP's (Radford et al. 2021; MIT licence, see
``assets/tokenizer/LICENSE-CLIP.txt``), derived from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` by
``scripts/make_tokenizer_assets.py``. Both SD families use this vocabulary; they differ only in padding:
SD 1.x (OpenAI CLIP in transformers) pads with ``<|endoftext|>`` (id 49407), SD 2.x (OpenCLIP) pads with id 0,
the token "!".
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm import assets

MAX_LENGTH = 77                       # CLIP's context: <|startoftext|> + 75 tokens + <|endoftext|>
END_OF_TEXT_ID = 49407
PAD_IDS = {"sd1": END_OF_TEXT_ID, "sd2": 0}


def bundled_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer built from the files shipped with ldm (no network)."""
    return CLIPTokenizer.from_pretrained(str(assets.TOKENIZER_DIR), local_files_only=True, model_max_length=MAX_LENGTH)


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A tokenizer saved in a folder (a diffusers pipeline's ``tokenizer/``), read without network access."""
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: list[str], pad_id: int, max_length: int = MAX_LENGTH, expand=None) -> torch.Tensor:
    """Token ids (B, max_length): start token, the prompt, end token, then ``pad_id`` up to ``max_length``.

    A prompt longer than the context keeps its first ``max_length - 2`` tokens and its end token, as CLIP and
    diffusers do; a warning names the words that were cut. ``expand``: ids -> ids (None: unchanged), e.g. a
    multi-vector embedding's token into its vectors' ids.
    """
    rows = tokenizer(list(prompts), add_special_tokens=True).input_ids
    if expand is not None:
        rows = [expand(ids) or ids for ids in rows]
    out = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length - 1 : -1])
            warnings.warn(
                f"prompt {i} is longer than the text encoder's {max_length} tokens; these words were cut: {cut!r}",
                stacklevel=3,
            )
            ids = ids[: max_length - 1] + ids[-1:]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
