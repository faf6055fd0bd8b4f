"""What the U-Net is conditioned on: the text context from one or two encoders and, for SDXL, the pooled text
embedding and the micro-conditioning numbers.

    SD 1.x / 2.x   context = encoder(prompt)                                   (B, 77, 768 | 1024)
    SDXL base      context = CLIP-L(prompt)[-2] ‖ bigG(prompt)[-2]            (B, 77, 2048)
                   text_embeds = bigG's projected end-of-text embedding         (B, 1280)
                   time_ids = (original h, w, crop top, left, target h, w)      (B, 6)
    SDXL refiner   context = bigG(prompt)[-2]; time_ids = (h, w, top, left, aesthetic score)   (B, 5)

Micro-conditioning (Podell et al. 2023, §2.2) tells the model the size the training image had and where it was
cropped; at inference diffusers' StableDiffusionXLPipeline passes original = target = the requested size and
crop (0, 0), which is the default here. The refiner was trained with an aesthetic score in place of the target
size: 6 for the image, 2.5 for the negative branch (diffusers' defaults). With ``force_zeros_for_empty_prompt``
(SDXL base's model_index.json) the negative branch is all zeros when no negative prompt is given.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ldm.pipeline.prompting import encode_text, pad_chunks

AESTHETIC_SCORE = 6.0            # diffusers StableDiffusionXLImg2ImgPipeline defaults
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning for one call; sizes are (height, width), None = the requested size."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def time_ids(self, height: int, width: int, aesthetic: bool, negative: bool) -> list[float]:
        original = self.original_size or (height, width)
        head = [*original, *self.crops_coords_top_left]
        if aesthetic:
            return head + [self.negative_aesthetic_score if negative else self.aesthetic_score]
        return head + list(self.target_size or (height, width))


class TextConditioner:
    """Prompts -> the U-Net's condition dict, for any number of text encoders (see the module docstring)."""

    cache_size = 64       # prompts whose conditions are kept (see encode_one)

    def __init__(self, encoders: Sequence, *, pooled: bool, aesthetic: bool = False, zeros_for_empty: bool = False):
        self.encoders = list(encoders)
        self.pooled = pooled                  # the U-Net takes text_embeds and time_ids (addition_embed_type)
        self.aesthetic = aesthetic            # time ids end in an aesthetic score (the refiner)
        self.zeros_for_empty = zeros_for_empty
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def clear_cache(self) -> None:
        """Forget every cached encoding (they are exact; this only frees their memory)."""
        self._cache.clear()

    def _state(self) -> tuple:
        """What an encoding depends on besides the prompt and its options: each encoder's weights (identity,
        storage and in-place version: LoRAs write into the weights, moving a model makes new storage) and its
        textual-inversion vectors."""
        state = []
        for encoder in self.encoders:
            state.extend((id(p), p.data_ptr(), p._version) for p in encoder.parameters())
            extra = getattr(encoder, "_extra", None)
            state.append(None if extra is None else (id(extra.vectors), extra.vectors._version))
            state.append(tuple(getattr(encoder, "_vectors", {})))
        return tuple(state)

    @classmethod
    def for_components(cls, components) -> TextConditioner:
        flags = getattr(components, "pipeline_config", None) or {}
        return cls(components.text_encoders, pooled=getattr(components.unet.config, "addition_embed_type", None) == "text_time",
                   aesthetic=bool(flags.get("requires_aesthetics_score")),
                   zeros_for_empty=bool(flags.get("force_zeros_for_empty_prompt")))

    @property
    def context_dim(self) -> int:
        return sum(e.hidden_size for e in self.encoders)

    @property
    def chunk_length(self) -> int:
        """Tokens per context chunk (77: BOS + 75 + EOS); long prompts give a whole number of chunks."""
        return self.encoders[0].max_length

    def chunks(self, context: torch.Tensor) -> int:
        return context.shape[1] // self.chunk_length

    def encode_one(self, prompt: str, clip_skip: int | None = None, emphasis: bool = True) -> dict[str, torch.Tensor]:
        """One prompt -> {"context": (1, L·k, D)} (+ {"text_embeds": (1, P)}), every encoder on its own tokens;
        with ``emphasis``, read in A1111's syntax (``ldm.pipeline.prompting.encode_text``).

        Without autograd the last ``cache_size`` results are kept and handed out again (as copies) while the
        encoders' weights and embeddings are unchanged (``_state``): the empty negative prompt and a prompt drawn
        again with other seeds cost nothing the second time, and give the very tensors a fresh encoding gives."""
        if torch.is_grad_enabled():
            return self._encode_one(prompt, clip_skip, emphasis)
        key = (prompt, clip_skip, emphasis, self._state())
        if key not in self._cache:
            self._cache[key] = self._encode_one(prompt, clip_skip, emphasis)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return {k: v.clone() for k, v in self._cache[key].items()}

    def _encode_one(self, prompt: str, clip_skip: int | None, emphasis: bool) -> dict[str, torch.Tensor]:
        contexts, pooled = [], None
        for k, encoder in enumerate(self.encoders):
            last = self.pooled and k == len(self.encoders) - 1
            context, p = encode_text(encoder, prompt, clip_skip, emphasis=emphasis, pooled=last)
            contexts.append(context)
            pooled = p if last else pooled
        if len({c.shape[1] for c in contexts}) > 1:
            raise ValueError(f"the text encoders split {prompt[:60]!r} into different numbers of 77-token chunks "
                             f"({[c.shape[1] // self.chunk_length for c in contexts]}); is an embedding loaded into "
                             "only one of them?")
        out = {"context": torch.cat(contexts, dim=-1) if len(contexts) > 1 else contexts[0]}
        if pooled is not None:
            out["text_embeds"] = pooled
        return out

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None, *, emphasis: bool = True,
               chunks: int = 1) -> dict[str, torch.Tensor]:
        """(B, ...) conditions; each distinct prompt is encoded once, on its own, so no prompt's conditions
        depend on what else is in the batch. Contexts of fewer chunks than the longest prompt's (or ``chunks``)
        are padded with the empty prompt's chunk, as A1111 does."""
        unique = list(dict.fromkeys(prompts))
        rows = [self.encode_one(p, clip_skip, emphasis) for p in unique]
        chunks = max(chunks, *(self.chunks(r["context"]) for r in rows))
        if any(self.chunks(r["context"]) != chunks for r in rows):
            empty = self.encode_one("", clip_skip, emphasis)["context"]
            for r in rows:
                r["context"] = pad_chunks(r["context"], chunks, empty)
        index = [unique.index(p) for p in prompts]
        return {key: torch.cat([rows[i][key] for i in index]) for key in rows[0]}

    def added(self, batch: int, height: int, width: int, sizes: SizeConditioning | None,
              negative: bool) -> dict[str, torch.Tensor]:
        """{"time_ids": (B, 6 | 5)} for a U-Net with micro-conditioning, else {}."""
        if not self.pooled:
            return {}
        ids = (sizes or SizeConditioning()).time_ids(height, width, self.aesthetic, negative)
        return {"time_ids": torch.tensor([ids] * batch, dtype=torch.float32)}
