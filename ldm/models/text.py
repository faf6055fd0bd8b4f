"""Text encoders of the SD family: prompts -> context (B, L, D) for the U-Net's cross-attention.

SD 1.x conditions on OpenAI CLIP ViT-L/14's text transformer (Radford et al. 2021), run here through
transformers' ``CLIPTextModel``; its last hidden state (after the final layer norm) is the context.
SD 2.x conditions on OpenCLIP ViT-H/14's text transformer (Cherti et al. 2023), run through the ``open_clip``
package, and takes the *penultimate* layer's output through the final layer norm (Stability AI's
``FrozenOpenCLIPEmbedder(layer="penultimate")``). diffusers stores that SD 2.x encoder as a 23-layer
``CLIPTextModel`` (the unused 24th layer dropped), so a model converted either way gives the same context.

``clip_skip`` follows the community convention: ``clip_skip=k`` takes the hidden state k - 1 layers before the
model's own output layer and passes it through the final layer norm; ``None`` or 1 is the model's own layer.
(diffusers counts one lower: its ``clip_skip=j`` is ours ``j + 1``.)

SDXL (Podell et al. 2023) reads *two* encoders, OpenAI CLIP ViT-L and OpenCLIP ViT-bigG/14 (both stored as
transformers CLIP models in diffusers folders), each at its penultimate layer *without* the final layer norm
(``final_norm=False``), and concatenates them to a 2048-wide context; bigG also gives the pooled, projected
embedding of the end-of-text token (``with_projection=True``) that SDXL's micro-conditioning takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ldm.models.tokenizer import MAX_LENGTH, PAD_IDS, bundled_tokenizer, tokenize

BACKENDS = ("transformers", "open_clip")
FAMILIES = tuple(PAD_IDS)


@dataclass
class TextEncoderConfig:
    """Architecture of a CLIP-style text transformer. Shared field names follow transformers' CLIPTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = MAX_LENGTH
    hidden_act: str = "quick_gelu"        # OpenAI CLIP: x * sigmoid(1.702 x); OpenCLIP: exact (erf) GELU
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768      # the pooled-embedding projection (None: none); unused by SD
    backend: str = "transformers"         # "transformers": CLIPTextModel | "open_clip": open_clip TextTransformer
    family: str = "sd1"                   # "sd1" | "sd2": padding and single-file layout
    skip_layers: int = 0                  # final layers the context never uses (1 = SD 2's penultimate layer)
    final_norm: bool = True               # the context goes through the final layer norm (SDXL: no)
    with_projection: bool = False         # also the pooled projected embedding (SDXL's bigG: text_embeds)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"text encoder backend {self.backend!r}: expected one of {BACKENDS}")
        if self.family not in FAMILIES:
            raise ValueError(f"text encoder family {self.family!r}: expected one of {FAMILIES}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if not 0 <= self.skip_layers < self.num_hidden_layers:
            raise ValueError(f"skip_layers {self.skip_layers} must be in [0, {self.num_hidden_layers})")

    @classmethod
    def sd1(cls) -> TextEncoderConfig:
        """OpenAI CLIP ViT-L/14's text tower, as SD 1.x uses it."""
        return cls()

    @classmethod
    def sd2(cls, model_name: str = "ViT-H-14") -> TextEncoderConfig:
        """OpenCLIP's text tower from its model config (no weights are fetched), penultimate layer as SD 2.x."""
        import open_clip

        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"open_clip has no model config named {model_name!r}")
        return cls.from_open_clip(cfg, family="sd2", skip_layers=1)

    @classmethod
    def from_open_clip(cls, model_cfg: dict, family: str = "sd2", skip_layers: int = 1) -> TextEncoderConfig:
        """From an open_clip model config dict (``embed_dim``, ``text_cfg``, optional ``quick_gelu``)."""
        text = model_cfg["text_cfg"]
        width = text.get("width", 512)
        return cls(
            vocab_size=text.get("vocab_size", 49408),
            hidden_size=width,
            intermediate_size=int(width * text.get("mlp_ratio", 4.0)),
            num_hidden_layers=text.get("layers", 12),
            num_attention_heads=text.get("heads", 8),
            max_position_embeddings=text.get("context_length", MAX_LENGTH),
            hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
            projection_dim=model_cfg["embed_dim"],
            backend="open_clip",
            family=family,
            skip_layers=skip_layers,
        )

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        """From :meth:`to_dict` output or a transformers CLIPTextConfig dict (other keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "family" not in d:
            # diffusers folders do not say; OpenCLIP (SD 2.x) uses exact GELU where OpenAI CLIP uses QuickGELU.
            values["family"] = "sd2" if d.get("hidden_act") == "gelu" else "sd1"
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def clip_config(self) -> dict:
        """keyword arguments of transformers' CLIPTextConfig for this architecture."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            **({"projection_dim": self.projection_dim} if self.projection_dim else {}),
        }


def _build_transformers(config: TextEncoderConfig) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if config.with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config.clip_config()))


def _build_open_clip(config: TextEncoderConfig) -> nn.Module:
    from open_clip.transformer import QuickGELU, TextTransformer

    if config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip text towers use gelu or quick_gelu, not {config.hidden_act!r}")
    if config.layer_norm_eps != 1e-5:
        raise ValueError(f"open_clip text towers use layer_norm_eps 1e-5, not {config.layer_norm_eps}")
    return TextTransformer(
        context_length=config.max_position_embeddings,
        vocab_size=config.vocab_size,
        width=config.hidden_size,
        heads=config.num_attention_heads,
        layers=config.num_hidden_layers,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        output_dim=config.projection_dim,
        act_layer=QuickGELU if config.hidden_act == "quick_gelu" else nn.GELU,
    )


def _without_init(build, config: TextEncoderConfig) -> nn.Module | None:
    """Build on the meta device, then allocate on the CPU with uninitialised weights (for weights about to
    be loaded: random init of a 354M-parameter tower takes seconds). The constant buffers are recomputed;
    None if the module has a buffer we do not know how to recompute."""
    with torch.device("meta"):
        model = build(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            owner = model.get_submodule(name.rpartition(".")[0])
            if name.endswith("position_ids"):          # CLIPTextEmbeddings: 0, 1, ..., 76
                buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))
            elif name.endswith("attn_mask") and hasattr(owner, "build_causal_mask"):    # open_clip: causal
                buffer.copy_(owner.build_causal_mask())
            else:
                return None
    return model


class _ExtraTokens:
    """Rows for ids past an nn.Embedding's table, by forward hooks: ids are clamped into the table on the
    way in, and the rows of the extra ids replaced on the way out (A1111 patches its embedding layer alike)."""

    def __init__(self, embedding: nn.Embedding):
        self.base = embedding.num_embeddings
        self.vectors = torch.empty(0, embedding.embedding_dim, dtype=embedding.weight.dtype)
        self._ids: torch.Tensor | None = None
        embedding.register_forward_pre_hook(self._clamp)
        embedding.register_forward_hook(self._fill)

    def _clamp(self, module, args):
        self._ids = args[0]
        return (args[0].clamp(max=self.base - 1), *args[1:])

    def _fill(self, module, args, out):
        ids, self._ids = self._ids, None
        extra = ids >= self.base
        if not extra.any():
            return out
        out = out.clone()
        out[extra] = self.vectors.to(out)[ids[extra] - self.base]
        return out


class TextEncoder(nn.Module):
    """prompts -> context (B, L, D), L = config.max_position_embeddings (77 in SD; fewer in a small model).
    ``tokenizer``: a CLIPTokenizer (default: the bundled one). ``init_weights=False`` leaves the weights
    uninitialised, for callers that load them right after."""

    def __init__(self, config: TextEncoderConfig | None = None, tokenizer=None, *, init_weights: bool = True):
        super().__init__()
        self.config = config or TextEncoderConfig()
        build = _build_open_clip if self.config.backend == "open_clip" else _build_transformers
        self.model = (None if init_weights else _without_init(build, self.config)) or build(self.config)
        self.tokenizer = tokenizer if tokenizer is not None else bundled_tokenizer()
        # A folder's own tokenizer knows its padding; the bundled one pads as the family was trained.
        own_pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = own_pad if own_pad is not None else PAD_IDS[self.config.family]
        self.max_length = self.config.max_position_embeddings
        self.hidden_size = self.config.hidden_size

    # -- tokens ------------------------------------------------------------------------------------------
    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, L) token ids, padded for this family; warns, naming the cut words, past L tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        vectors = getattr(self, "_vectors", {})

        def expand(ids: list[int]) -> list[int]:
            return [j for i in ids for j in vectors.get(i, [i])]

        return tokenize(self.tokenizer, prompts, self.pad_id, self.max_length, expand=expand if vectors else None)

    def token_runs(self, text: str) -> list[list[int]]:
        """``text``'s token ids without BOS/EOS, one run per token; a textual-inversion token becomes the run of
        its vectors' ids (kept together by the prompt chunker)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        vectors = getattr(self, "_vectors", {})
        return [vectors.get(i, [i]) for i in ids]

    def chunk_ids(self, ids: list[int]) -> torch.Tensor:
        """(L,) ids of one chunk: BOS, ``ids`` (at most L - 2), EOS, then this family's padding."""
        if len(ids) > self.max_length - 2:
            raise ValueError(f"a chunk holds at most {self.max_length - 2} tokens, got {len(ids)}")
        out = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        row = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        out[: len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def add_embedding(self, token: str, vectors: torch.Tensor) -> list[int]:
        """A textual-inversion embedding (Gal et al. 2022): ``vectors`` (N, D) become new tokens ``token``,
        ``token_1`` ... ``token_{N-1}`` (diffusers' names), and ``token`` in a prompt stands for all N.
        The base embedding table is untouched (its state dict stays the model's); returns the new ids."""
        vectors = vectors.reshape(-1, self.hidden_size)
        names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
        clash = [n for n in names if n in self.tokenizer.get_vocab()]
        if clash:
            raise ValueError(f"token {clash[0]!r} is already in the tokenizer's vocabulary; pick another token")
        self.tokenizer.add_tokens(names)
        ids = self.tokenizer.convert_tokens_to_ids(names)
        table = self._extra_table()
        if ids != list(range(table.base + table.vectors.shape[0], table.base + table.vectors.shape[0] + len(ids))):
            raise ValueError(f"the tokenizer gave {token!r} ids {ids}, not the next free rows")
        table.vectors = torch.cat([table.vectors, vectors.detach().to(table.vectors)])
        self._vectors = {**getattr(self, "_vectors", {}), ids[0]: ids}
        return ids

    def _extra_table(self) -> _ExtraTokens:
        if not hasattr(self, "_extra"):
            self._extra = _ExtraTokens(self.input_embeddings())
        return self._extra

    def input_embeddings(self) -> nn.Embedding:
        """The token-embedding table (CLIPTextModel's or open_clip's)."""
        if self.config.backend == "open_clip":
            return self.model.token_embedding
        return self.model.get_input_embeddings()

    # -- context -----------------------------------------------------------------------------------------
    def forward(self, prompts: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
        ids = self.tokenize(prompts).to(next(self.model.parameters()).device)
        return self.encode(ids, clip_skip)

    def layers_used(self, clip_skip: int | None = None) -> int:
        """How many transformer layers the context passes through."""
        if clip_skip is not None and clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1 (1 = the model's own layer), got {clip_skip}")
        used = self.config.num_hidden_layers - self.config.skip_layers - ((clip_skip or 1) - 1)
        if used < 1:
            raise ValueError(
                f"clip_skip={clip_skip} skips every layer of this {self.config.num_hidden_layers}-layer text encoder")
        return used

    def encode(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """Token ids (B, L) -> hidden states (B, L, D) (after the final layer norm unless config.final_norm is
        False)."""
        used = self.layers_used(clip_skip)
        if self.config.backend == "open_clip":
            return self._encode_open_clip(ids, used)
        return self._encode_transformers(ids, used)[0]

    def encode_pooled(self, ids: torch.Tensor, clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, projection_dim)) in one pass: the pooled embedding is the projected,
        final-normed last layer at the end-of-text token, whatever ``clip_skip`` (as SDXL and diffusers use it)."""
        if not (self.config.with_projection and self.config.backend == "transformers"):
            raise ValueError("this text encoder has no pooled projection (with_projection=False)")
        context, pooled = self._encode_transformers(ids, self.layers_used(clip_skip), pooled=True)
        return context, pooled

    def _encode_transformers(self, ids: torch.Tensor, used: int, pooled: bool = False):
        if used == self.config.num_hidden_layers and self.config.final_norm and not pooled:
            return self.model(ids).last_hidden_state, None
        out = self.model(ids, output_hidden_states=True)    # hidden_states: embeddings, then one per layer
        hidden = out.hidden_states[used]
        if self.config.final_norm:
            core = getattr(self.model, "text_model", self.model)            # transformers < 5 nests the model
            hidden = core.final_layer_norm(hidden)
        return hidden, (out.text_embeds if pooled else None)

    def _encode_open_clip(self, ids: torch.Tensor, used: int) -> torch.Tensor:
        tower = self.model
        length = ids.shape[1]
        x = tower.token_embedding(ids) + tower.positional_embedding[:length]
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None    # causal, additive
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in tower.transformer.resblocks[:used]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return tower.ln_final(x) if self.config.final_norm else x

    # -- weights under version-independent names ---------------------------------------------------------
    def _prefix(self) -> str:
        """transformers < 5 nests CLIPTextModel's modules under ``text_model.``; 5.x does not, except in
        CLIPTextModelWithProjection (which keeps ``text_projection.`` at the top)."""
        return "text_model." if self.config.backend == "transformers" and hasattr(self.model, "text_model") else ""

    def _ours(self, key: str) -> str | None:
        """A backend state-dict key -> its version-independent name (None: a buffer we do not save)."""
        prefix = self._prefix()
        if key.endswith("position_ids"):
            return None
        if key.startswith(prefix):
            return key[len(prefix):]
        return key if key.startswith("text_projection.") else None

    def _theirs(self, name: str) -> str:
        return name if name.startswith("text_projection.") else self._prefix() + name

    def weights(self) -> dict[str, torch.Tensor]:
        """The backend's tensors, named as transformers 5's CLIPTextModel (+ ``text_projection.weight`` with
        a projection) or open_clip's TextTransformer."""
        return {name: v for k, v in self.model.state_dict().items() if (name := self._ours(k)) is not None}

    def load_weights(self, tensors: dict[str, torch.Tensor], *, assign: bool = False) -> None:
        """Copy tensors named as :meth:`weights` names them (every name required, shapes checked by torch).
        ``assign=True`` takes the tensors themselves instead of copying them (loaders: no second copy of a
        file's weights; their dtype becomes the encoder's)."""
        result = self.model.load_state_dict({self._theirs(k): v for k, v in tensors.items()}, strict=False,
                                            assign=assign)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise KeyError(f"text encoder weights: missing {missing}, unexpected {result.unexpected_keys}")
