"""Attention for the SD-family U-Net and VAE: multi-head attention, the GEGLU feed-forward, the transformer
block, and the spatial transformer that wraps it around a feature map.

Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need", eq. 1):
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   d = head dimension,
computed per head after splitting the channels into `heads` groups. Three interchangeable backends compute it:

- "sdpa":     torch.nn.functional.scaled_dot_product_attention (fused, memory-efficient kernels; the default)
- "xformers": xformers.ops.memory_efficient_attention (optional extra: pip install ldm-diffusion[xformers])
- "sliced":   the plain softmax formula evaluated a few (batch, head) pairs at a time, so the N x M score
              matrix only ever exists for `slice_size` of them; bounds memory at some cost in speed.

Module and parameter names (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ...) follow diffusers'
`Attention` / `BasicTransformerBlock` / `Transformer2DModel` (diffusers/models/attention*.py,
transformers/transformer_2d.py), so their state dicts load unchanged.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ldm.models.checkpointing import Checkpointed
from ldm.models.conv import graph_capture, map_to_tokens, tokens_in, tokens_out, tokens_to_map

BACKENDS = ("sdpa", "xformers", "sliced")


def check_backend(name: str, slice_size: int | None = None) -> None:
    """Raise a clear error for an unknown backend, a bad slice size, or xformers asked for but missing."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"attention slice_size must be a positive int or None, got {slice_size!r}")
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError(
            "the 'xformers' attention backend needs the xformers package: pip install ldm-diffusion[xformers]"
        )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D) as a strided view (no copy)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int, upcast: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, N, D) inputs, `slice_size` (batch, head) pairs at a time."""
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    scale = d**-0.5
    out = torch.empty_like(q)
    for start in range(0, b * h, slice_size):
        part = slice(start, start + slice_size)
        qp, kp = (q[part].float(), k[part].float()) if upcast else (q[part], k[part])
        weights = torch.bmm(qp * scale, kp.transpose(1, 2)).softmax(dim=-1)
        out[part] = torch.bmm(weights.to(v.dtype), v[part])
    return out.view(b, h, n, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    backend: str = "sdpa",
    slice_size: int | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Multi-head attention. q: (B, N, H*D), k and v: (B, M, H*D) -> (B, N, H*D).

    `upcast` computes the scores and softmax in float32 for half-precision inputs (SD 2.x needs this in fp16,
    its attention logits overflow otherwise); it changes nothing in float32.
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16) and backend != "sliced":
        q, k, v = q.float(), k.float(), v.float()
    if backend == "xformers":
        import xformers.ops  # optional extra, checked by check_backend

        out = xformers.ops.memory_efficient_attention(
            q.unflatten(-1, (heads, -1)), k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1))
        )
        return out.flatten(2).to(dtype)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if backend == "sliced":
        out = _sliced(q, k, v, slice_size or heads, upcast)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(dtype)


def _computed(layer: nn.Module) -> bool:
    """True when a layer's output is not a function of its parameters alone (parametrized weight, hooks)."""
    return parametrize.is_parametrized(layer) or bool(layer._forward_hooks or layer._forward_pre_hooks)


class Attention(nn.Module):
    """Multi-head self- (context_dim None) or cross-attention over token sequences (B, N, query_dim)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        *,
        bias: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.backend = "sdpa"
        self.slice_size: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    fuse_qkv = True
    cache_kv = True

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_kv_cache", None)  # a cache, not state: copies and pickles start without it
        return state

    def project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Q, K, V projections. Self-attention runs one GEMM against the concatenated [W_q; W_k; W_v]
        (the concatenation costs a copy of the weights, far less than re-reading x three times)."""
        if context is None and self.fuse_qkv:
            layers = (self.to_q, self.to_k, self.to_v)
            weight = torch.cat([layer.weight for layer in layers])
            bias = None if self.to_q.bias is None else torch.cat([layer.bias for layer in layers])
            return F.linear(x, weight, bias).chunk(3, dim=-1)
        if context is None:
            return self.to_q(x), self.to_k(x), self.to_v(x)
        return (self.to_q(x), *self.context_kv(context))

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the cross-attention context. The text context is the same at every sampling step, so
        without autograd the last result is kept and reused while the context's values and the projections'
        parameters (identity, storage, in-place version) are unchanged: exactly what a fresh projection gives.
        Layers whose weight is computed (a parametrization such as LoRA) or hooked are never cached."""
        layers = (self.to_k, self.to_v)
        if (torch.is_grad_enabled() or not self.cache_kv or graph_capture()
                or any(_computed(layer) for layer in layers)):
            return self.to_k(context), self.to_v(context)
        params = [(id(p), p.data_ptr(), p._version) for layer in layers for p in layer.parameters()]
        cached = self.__dict__.get("_kv_cache")
        if cached is not None and cached[0] == params and cached[1].shape == context.shape \
                and cached[1].dtype == context.dtype and cached[1].device == context.device \
                and torch.equal(cached[1], context):
            return cached[2], cached[3]
        k, v = self.to_k(context), self.to_v(context)
        self.__dict__["_kv_cache"] = (params, context.clone(), k, v)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, context)
        out = attention(q, k, v, self.heads, backend=self.backend, slice_size=self.slice_size, upcast=self.upcast)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020, "GLU Variants Improve Transformer"): a · GELU(b), [a, b] = x W + c."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return value * F.gelu(gate)
        return F.gelu(gate).mul_(value)  # without autograd, reuse GELU's output buffer


class FeedForward(nn.Module):
    """Position-wise feed-forward: GEGLU to 4·dim, dropout, linear back to dim (keys net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(Checkpointed):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the text context, feed-forward,
    each added back to the residual stream (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
    Diffusion Models", §3.3 and appendix: the SpatialTransformer's BasicTransformerBlock)."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int, *, upcast: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, upcast=upcast, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast=upcast, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Each sublayer's output is a fresh tensor no backward formula needs, so the residual is added in place.
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, project the (B, C, H, W) map to H·W tokens, run the transformer blocks
    against the context, project back and add the input (Rombach et al. 2022, SpatialTransformer).

    `linear` selects nn.Linear projections (SD 2.x) instead of 1x1 convolutions (SD 1.x); the two are the same
    map, with weights of shape (C_out, C_in) vs (C_out, C_in, 1, 1); both run as one batched GEMM each way
    (ldm.models.conv.tokens_in / tokens_out), so the map is never permuted and copied.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        *,
        depth: int = 1,
        groups: int = 32,
        linear: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast=upcast, dropout=dropout)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = tokens_in(self.norm(x), self.proj_in.weight, self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return tokens_out(tokens, self.proj_out.weight, self.proj_out.bias, x).add_(x)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, with its own GroupNorm and a residual
    connection: the VAE's mid-block attention (Rombach et al. 2022; diffusers' Attention with
    `residual_connection=True`, keys group_norm, to_q, to_k, to_v, to_out.0, all with bias)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, None, heads=1, head_dim=channels, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = map_to_tokens(self.group_norm(x))
        return tokens_to_map(super().forward(tokens), x) + x
