"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models"): an image as a prompt.

A CLIP vision encoder's output for the reference image is projected to a few context tokens (``image_proj``);
every cross-attention layer of the U-Net then attends to them with its own key and value projections
(``to_k_ip``, ``to_v_ip``: *decoupled cross-attention*, §3.2) and adds that attention's output, times the
adapter's scale, to the text attention's output before the output projection.

Projections, with the original files' key names (github.com/tencent-ailab/IP-Adapter ``ip_adapter/``):
  base       ``ImageProjModel``: the pooled image embedding -> Linear -> n tokens -> LayerNorm
  Plus       ``Resampler`` (a Perceiver, Jaegle et al. 2021): learned queries attend to the encoder's penultimate
             hidden states; Plus-face uses the same
  Full-face  ``MLPProjModel``: every penultimate hidden state -> Linear, GELU, Linear, LayerNorm
The ``ip_adapter`` layers are numbered as the files number them: 1, 3, 5, ... for the U-Net's cross-attention
layers in diffusers' ``attn_processors`` order (down blocks, up blocks, middle block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.models.attention import Attention, attention

PROJECTIONS = ("base", "plus", "full")
HEAD_DIM = 64          # the Resampler's head width in every released IP-Adapter Plus


@dataclass(frozen=True)
class IPAdapterConfig:
    """What an IP-Adapter file's shapes say (ldm.checkpoints.control infers it)."""

    projection: str                          # "base", "plus" or "full"
    image_dim: int                           # the encoder's width the projection takes (pooled or hidden)
    context_dim: int                         # the U-Net's text context width (the tokens' width)
    tokens: int                              # image tokens per image
    layers: tuple[tuple[int, int], ...]      # (context width, attention width) of each cross-attention layer
    depth: int = 4                           # Resampler only
    width: int = 768                         # Resampler only: its working width
    ff_mult: int = 4                         # Resampler only

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise ValueError(f"IPAdapterConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}")

    @property
    def hidden_states(self) -> bool:
        """Whether the projection takes the encoder's penultimate hidden states (not its pooled embedding)."""
        return self.projection != "base"


class ImageProjection(nn.Module):
    def __init__(self, image_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(image_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class MLPProjection(nn.Module):
    def __init__(self, image_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """The latents attend to [image features ‖ latents] (Perceiver cross-attention, keys to_q, to_kv, to_out)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * HEAD_DIM, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * HEAD_DIM, bias=False)
        self.to_out = nn.Linear(heads * HEAD_DIM, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        dim = cfg.width
        self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, dim))
        self.proj_in = nn.Linear(cfg.image_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim // HEAD_DIM),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * cfg.ff_mult, bias=False), nn.GELU(),
                                         nn.Linear(dim * cfg.ff_mult, dim, bias=False))])
            for _ in range(cfg.depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class _IPLayer(nn.Module):
    def __init__(self, context_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)


class IPAdapter(nn.Module):
    """image_proj(encoder output) -> tokens (B, n, context_dim); ip_adapter: the per-layer key/value projections."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.projection == "base":
            self.image_proj = ImageProjection(cfg.image_dim, cfg.context_dim, cfg.tokens)
        elif cfg.projection == "plus":
            self.image_proj = Resampler(cfg)
        else:
            self.image_proj = MLPProjection(cfg.image_dim, cfg.context_dim)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): _IPLayer(c, inner) for i, (c, inner) in enumerate(cfg.layers)})

    def tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.image_proj(encoded)


def cross_attention_layers(unet: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of each cross-attention layer of a U-Net, in the files' order (diffusers' attn_processors:
    down blocks, up blocks, middle block; within them, module order)."""
    found = []
    for part in ("down_blocks", "up_blocks", "mid_block"):
        for module in getattr(unet, part).modules():
            child = getattr(module, "attn2", None)
            if isinstance(child, (Attention, IPAttention)):
                found.append((module, "attn2"))
    return found


class IPState:
    """What the IP layers of one U-Net call need: the adapters' layers and the weight of each (a float, or one
    per row as a (rows, 1, 1) tensor; 0 leaves the adapter out). The image tokens ride at the end of the context."""

    def __init__(self, adapters: list[IPAdapter]):
        self.adapters = adapters
        self.weights: list = [0.0] * len(adapters)
        self.tokens = [a.config.tokens for a in adapters]


class IPAttention(nn.Module):
    """A cross-attention layer with decoupled image attention: softmax(Q K_text^T) V_text + Σ_j w_j softmax(Q K_j^T)
    V_j, then the layer's output projection (diffusers' IPAdapterAttnProcessor2_0). The context it gets is
    [text ‖ each adapter's image tokens]."""

    def __init__(self, attn: Attention, index: int, state: IPState):
        super().__init__()
        self.attn, self.key, self.state = attn, str(2 * index + 1), state

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        attn, state = self.attn, self.state
        n = sum(state.tokens)
        text, images = context[:, :context.shape[1] - n], context[:, context.shape[1] - n:]
        q, k, v = attn.project(x, text)
        options = dict(backend=attn.backend, slice_size=attn.slice_size, upcast=attn.upcast)
        out = attention(q, k, v, attn.heads, **options)
        for adapter, tokens, weight in zip(state.adapters, images.split(state.tokens, dim=1), state.weights):
            if isinstance(weight, float) and weight == 0.0:
                continue
            layer = adapter.ip_adapter[self.key]
            ip = attention(q, layer.to_k_ip(tokens), layer.to_v_ip(tokens), attn.heads, **options)
            out = out + weight * ip
        return attn.to_out[1](attn.to_out[0](out))


def install(unet: nn.Module, state: IPState) -> list:
    """Put IPAttention around each cross-attention layer; returns what ``uninstall`` needs to undo it."""
    placed = []
    for i, (parent, name) in enumerate(cross_attention_layers(unet)):
        original = getattr(parent, name)
        setattr(parent, name, IPAttention(original, i, state))
        placed.append((parent, name, original))
    return placed


def uninstall(placed: list) -> None:
    for parent, name, original in placed:
        setattr(parent, name, original)
