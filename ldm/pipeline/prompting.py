"""A1111's prompt syntax: emphasis, BREAK, prompts past 75 tokens, ``<lora:NAME:W>`` tags.

Behaviour follows AUTOMATIC1111's stable-diffusion-webui as its wiki ("Features: Attention/emphasis", "BREAK",
"Infinite prompt length") and the examples in its ``parse_prompt_attention`` docstring describe it; the code
is ldm's own.

- ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:1.5)`` sets a factor of 1.5; brackets
  nest by multiplying; an unclosed bracket applies to the rest of the prompt; a stray closing one is text;
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, a lone backslash vanishes.
- ``BREAK`` (a word of its own, outside brackets) ends the current 75-token chunk.
- The prompt is cut into chunks of 75 tokens (``max_length - 2``), each encoded as BOS + tokens + EOS + padding;
  a chunk that fills up breaks after the last comma of its final 20 tokens, and an embedding's vectors never
  straddle two chunks. Contexts are concatenated along the token axis.
- Each token's hidden states are multiplied by its weight, then the chunk's mean is restored to its
  unweighted value (A1111's "Original" emphasis).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ldm.checkpoints.embeddings import read_embedding
from ldm.pipeline.png_info import lora_hash

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ["BREAK", -1.0]
COMMA_BACKTRACK = 20                       # A1111's default "comma_padding_backtrack"
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPABLE = "()[]\\"
_SPECIAL = "\\()[]:"
_TAG = re.compile(r"<(lora|lyco):([^>]+)>")


def _scan(text: str):
    """Yield (kind, value) lexemes: ("text", s), ("open", "(" | "["), ("close", ")" | "]"), ("weight", (s, w))."""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            yield ("literal", nxt if nxt in _ESCAPABLE and nxt else "")
            i += 2 if nxt in _ESCAPABLE and nxt else 1
        elif c in "([":
            yield "open", c
            i += 1
        elif c == ":" and (m := _WEIGHT.match(text, i)) and _is_number(m.group(1)):
            yield "weight", (m.group(0), float(m.group(1)))
            i = m.end()
        elif c in ")]":
            yield "close", c
            i += 1
        elif c == ":":
            yield "text", c
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in _SPECIAL:
                j += 1
            yield "text", text[i:j]
            i = j


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False        # A1111 would raise on "(x:1.2.3)"; ldm keeps it as text
    return True


def parse_emphasis(text: str) -> list[list]:
    """A1111's ``parse_prompt_attention``: [[text, weight], ...], runs of equal weight merged, BREAK as
    ["BREAK", -1]. ``parse_emphasis("an (important) word")`` -> [['an ', 1.0], ['important', 1.1], [' word', 1.0]]."""
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in out[start:]:
            piece[1] *= factor

    for kind, value in _scan(text):
        if kind == "literal":
            out.append([value, 1.0])
        elif kind == "open":
            (rounds if value == "(" else squares).append(len(out))
        elif kind == "weight" and rounds:
            scale(rounds.pop(), value[1])
        elif kind == "close" and value == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif kind == "close" and value == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            raw = value[0] if kind == "weight" else value
            for k, part in enumerate(_BREAK_SPLIT.split(raw)):
                if k:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in out or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def has_syntax(text: str) -> bool:
    """Whether parsing changes anything: the prompt is not one plain run of weight 1."""
    return parse_emphasis(text) != [[text, 1.0]]


@dataclass(frozen=True)
class LoraTag:
    name: str
    text_encoder: float
    unet: float


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """Remove ``<lora:NAME>``, ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>`` (``lyco`` alike) from a prompt."""
    tags = []
    for match in _TAG.finditer(text):
        name, *weights = match.group(2).split(":")
        values = [float(w) for w in weights[:2] if _is_number(w)] or [1.0]
        tags.append(LoraTag(name.strip(), values[0], values[-1]))
    return _TAG.sub("", text), tags


@dataclass
class Chunk:
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_tokens(pieces: list[tuple[list[list[int]], float]], size: int, comma_id: int | None,
                 breaks: set[int]) -> list[Chunk]:
    """Token runs with weights -> chunks of at most ``size`` tokens (before BOS/EOS). A run is one token, or an
    embedding's vectors (never split). ``breaks``: indices of pieces that are BREAK."""
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for index, (runs, weight) in enumerate(pieces):
        if index in breaks:
            close()
            continue
        for run in runs:
            if len(run) == 1 and run[0] == comma_id:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                keep = last_comma + 1
                moved = Chunk(chunk.ids[keep:], chunk.weights[keep:])
                chunk.ids, chunk.weights = chunk.ids[:keep], chunk.weights[:keep]
                close()
                chunk = moved
            if len(chunk.ids) + len(run) > size and chunk.ids:
                close()
            chunk.ids += run
            chunk.weights += [weight] * len(run)
    if chunk.ids or not chunks:
        close()
    return chunks


def encode_text(encoder, prompt: str, clip_skip=None, *, emphasis: bool = True, pooled: bool = False):
    """(context (1, L·k, D), pooled (1, P) or None) of one prompt through one text encoder. With ``emphasis``
    the prompt is read in A1111's syntax (``<lora:...>`` tags removed); a prompt with no syntax that fits in one
    chunk takes the plain path, so its context is bit-identical to encoding without syntax."""
    text = extract_lora_tags(prompt)[0] if emphasis else prompt
    if not emphasis or (not has_syntax(text) and len(encoder.token_runs(text)) <= encoder.max_length - 2):
        if not pooled:
            return encoder([text], clip_skip=clip_skip), None
        ids = encoder.tokenize([text]).to(next(encoder.model.parameters()).device)
        return encoder.encode_pooled(ids, clip_skip)
    return encode_weighted(encoder, text, clip_skip, pooled)


def encode_weighted(encoder, prompt: str, clip_skip=None, pooled: bool = False):
    """(context (1, L·k, D), pooled or None) of ``prompt`` in A1111's syntax (k chunks of L = encoder.max_length
    tokens); the pooled embedding is the first chunk's, unweighted, as A1111 takes it for SDXL."""
    pieces = parse_emphasis(prompt)
    breaks = {i for i, (t, w) in enumerate(pieces) if t == BREAK[0] and w == BREAK[1]}
    runs = [(encoder.token_runs(text) if i not in breaks else [], w) for i, (text, w) in enumerate(pieces)]
    comma = encoder.tokenizer.convert_tokens_to_ids(",</w>")
    device = next(encoder.model.parameters()).device
    outs, first_pooled = [], None
    for chunk in chunk_tokens(runs, encoder.max_length - 2, comma, breaks):
        ids = encoder.chunk_ids(chunk.ids).to(device)
        if pooled and first_pooled is None:
            z, first_pooled = encoder.encode_pooled(ids[None], clip_skip)
        else:
            z = encoder.encode(ids[None], clip_skip)
        weights = [1.0, *chunk.weights] + [1.0] * (ids.shape[0] - len(chunk.weights) - 1)
        if any(w != 1.0 for w in weights):
            mean = z.mean()
            z = z * torch.tensor(weights, dtype=z.dtype, device=z.device)[None, :, None]
            z = z * (mean / z.mean())
        outs.append(z)
    return torch.cat(outs, dim=1), first_pooled


def pad_chunks(context: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """(B, L·k, D) -> (B, L·chunks, D), appending the empty prompt's chunk (A1111 pads cond and uncond alike)."""
    missing = chunks - context.shape[1] // empty.shape[1]
    if missing <= 0:
        return context
    return torch.cat([context, empty.expand(context.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)


class PromptFeatures:
    """The Pipeline's side of A1111's habits (a mixin): prompts in its syntax, ``<lora:...>`` tags from
    ``lora_dir``, textual-inversion embeddings. Expects ``text_encoders``, ``emphasis``, ``lora_dir``,
    ``lora_strict``, ``dtype`` and ``load_lora``."""

    @contextlib.contextmanager
    def prompt_loras(self, prompts: Sequence[str]):
        """Apply the ``<lora:NAME:W>`` tags of ``prompts`` (from ``lora_dir``) for the duration; yields A1111's
        "Lora hashes" text ("name: hash, ...") or "" when there are none."""
        tags: dict[str, LoraTag] = {}
        for p in prompts if self.emphasis else ():
            for tag in extract_lora_tags(p)[1]:
                tags.setdefault(tag.name, tag)
        handles = []
        try:
            for tag in tags.values():
                path = self._lora_file(tag.name)
                handles.append(self.load_lora(path, 1.0, self.lora_strict,
                                              scales={"text_encoder": tag.text_encoder, "text_encoder_2": tag.text_encoder,
                                                      "unet": tag.unet}))
            yield ", ".join(f"{name}: {lora_hash(h.path)}" for name, h in zip(tags, handles))
        finally:
            for handle in handles:
                handle.remove()

    def _lora_file(self, name: str) -> Path:
        """NAME.safetensors (.pt, .ckpt) in ``lora_dir``, else the library's LoRA of that name."""
        library = getattr(self, "library", None)
        if self.lora_dir is None and library is None:
            raise ValueError(f"the prompt asks for <lora:{name}:...> but no LoRA folder is set (lora_dir= / "
                             "--lora-dir, or a models folder: models_dir= / --models-dir)")
        for suffix in (".safetensors", ".pt", ".ckpt") if self.lora_dir is not None else ():
            if (self.lora_dir / f"{name}{suffix}").is_file():
                return self.lora_dir / f"{name}{suffix}"
        if library is None:
            raise ValueError(f"<lora:{name}:...>: no {name}.safetensors in {self.lora_dir}")
        return library.find("lora", name).path

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL
        clip_l/clip_g) as ``token`` (default: the file's stem) to every text encoder; a prompt's ``token`` stands
        for all of its vectors. Returns the tokens. A file without vectors of each encoder's width is refused
        before any encoder changes."""
        slots = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}     # SDXL files' keys, by encoder
        encoders = [(getattr(self, name), slot) for name, slot in slots.items() if getattr(self, name) is not None]
        found = [read_embedding(path, token, encoder.hidden_size, slot) for encoder, slot in encoders]
        for (encoder, _), embeddings in zip(encoders, found):
            for name, vectors in embeddings.items():
                encoder.add_embedding(name, vectors.to(self.dtype))
        return list(found[0])

    def load_library(self, library, embeddings_dir=None):
        """Load ``embeddings_dir``'s embeddings, then the ``library``'s (``ldm.checkpoints.library``) under their
        stems, skipping those for another model family as A1111 does; returns the library (or None)."""
        if embeddings_dir is not None:
            self.load_embeddings_dir(embeddings_dir)
        for entry in library.of("embedding") if library is not None else ():
            with contextlib.suppress(ValueError, OSError):     # CheckpointError is a ValueError
                self.load_textual_inversion(entry.path, token=entry.path.stem)
        return library

    def load_embeddings_dir(self, folder) -> list[str]:
        """Every embedding file in ``folder``, each under its stem (A1111's embeddings folder); files for
        another text encoder are skipped with a warning."""
        loaded = []
        for path in sorted(Path(folder).iterdir()):
            if path.suffix in (".pt", ".safetensors", ".bin"):
                try:
                    loaded += self.load_textual_inversion(path)
                except ValueError as exc:
                    warnings.warn(f"skipped embedding {path.name}: {exc}", stacklevel=2)
        return loaded
