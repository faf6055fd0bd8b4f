"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): new token vectors for the
text encoder, read from the files the community shares.

    A1111 .pt            {"string_to_param": {"*": (N, D)}, "name": ..., ...}   read with weights_only=True
    A1111 .safetensors   {"emb_params": (N, D)}
    diffusers            {"<token>": (D,) or (N, D)}  (learned_embeds.bin / .safetensors)
    SDXL                 {"clip_l": (N, 768), "clip_g": (N, 1280)}   (the rows for SD 1's CLIP-L are clip_l)

A pickle that would run code is refused before anything in it runs (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ldm.checkpoints.tensor_io import CheckpointError, read_safetensors, read_safetensors_header

# Keys that hold the vectors, by format; SDXL's per-encoder keys by hidden size (CLIP-L 768, bigG 1280).
VECTOR_KEYS = ("emb_params", "string_to_param")
SDXL_KEYS = {768: "clip_l", 1280: "clip_g"}


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        read_safetensors_header(path)
        return read_safetensors(path, "embedding file")[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: its pickle asks for more than plain tensors, which could "
                              f"run code ({str(exc).splitlines()[0][:120]}); convert it to .safetensors with a "
                              "tool you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or not an embedding file ({str(exc).splitlines()[0]})") from None


def read_embedding(path: str | Path, token: str | None = None, hidden_size: int | None = None,
                   slot: str | None = None) -> dict[str, torch.Tensor]:
    """``{token: (N, D) vectors}`` of an embedding file; ``token`` defaults to the file's stem (diffusers files
    name their own unless ``token`` is given). ``hidden_size``: the text encoder's width, checked. ``slot``: which
    of an SDXL file's keys the encoder takes ("clip_l" / "clip_g"; default: by width, ``SDXL_KEYS``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding file {path} does not exist")
    data = _read(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not an embedding")
    name = token or path.stem
    if "string_to_param" in data:
        params = data["string_to_param"]
        found = {name: next(iter(params.values()))} if isinstance(params, dict) and params else {}
    elif "emb_params" in data:
        found = {name: data["emb_params"]}
    elif (slot or SDXL_KEYS.get(hidden_size)) in data:
        found = {name: data[slot or SDXL_KEYS[hidden_size]]}
    else:
        found = {(token or k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(found) != 1:
            raise CheckpointError(f"{path}: not an embedding ldm reads (A1111 string_to_param / emb_params, "
                                  f"diffusers {{token: vector}}, SDXL clip_l/clip_g); keys: {sorted(data)[:8]}")
    out = {}
    for key, vectors in found.items():
        vectors = vectors.detach().float()
        vectors = vectors[None] if vectors.dim() == 1 else vectors
        if hidden_size is not None and vectors.shape[-1] != hidden_size:
            raise ValueError(f"{path}: vectors of width {vectors.shape[-1]}, but this text encoder's is "
                             f"{hidden_size} (an embedding for another model family?)")
        out[key] = vectors.reshape(-1, vectors.shape[-1])
    return out
