"""Attention: the backends against the textbook formula, and each module against its diffusers twin."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as DBasicTransformerBlock
from diffusers.models.attention_processor import Attention as DAttention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from model_parity import rel_err, share_weights

from ldm.models.attention import (
    Attention,
    BasicTransformerBlock,
    SpatialSelfAttention,
    Transformer2D,
    attention,
    check_backend,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # many small ops: threads cost more than they save


def reference_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, in float64."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


def qkv(b=2, n=24, m=9, inner=32, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, inner, generator=g) * scale  # large logits: the softmax is far from uniform
    k = torch.randn(b, m, inner, generator=g)
    v = torch.randn(b, m, inner, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend, slice_size", [("sdpa", None), ("sliced", None), ("sliced", 1), ("sliced", 3)])
def test_backends_match_formula(backend, slice_size):
    q, k, v = qkv()
    out = attention(q, k, v, heads=4, backend=backend, slice_size=slice_size)
    assert out.shape == q.shape
    assert rel_err(out, reference_attention(q, k, v, 4)) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "sliced"])
def test_upcast_computes_half_precision_in_float32(backend):
    """bfloat16 inputs with upcast: the result is what float32 attention gives on the same (rounded) inputs,
    returned in bfloat16."""
    q, k, v = qkv(dtype=torch.bfloat16)
    out = attention(q, k, v, heads=4, backend=backend, upcast=True)
    assert out.dtype == torch.bfloat16
    expected = reference_attention(q.float(), k.float(), v.float(), 4)
    assert rel_err(out.float(), expected) < 1e-2


def test_check_backend_errors():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_backend("flash")
    with pytest.raises(ValueError, match="slice_size"):
        check_backend("sliced", 0)
    check_backend("sliced", 2)


def boosted(state_module):
    """Scale to_q/to_k so attention logits are O(1) and a wrong scale or head split cannot hide."""
    with torch.no_grad():
        for name, p in state_module.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                p.mul_(3.0)


def test_self_and_cross_attention_match_diffusers():
    g = torch.Generator().manual_seed(1)
    for context_dim in (None, 24):
        ours = Attention(32, context_dim, heads=4, head_dim=8)
        theirs = DAttention(32, cross_attention_dim=context_dim, heads=4, dim_head=8)
        share_weights(ours, theirs)
        boosted(ours)
        boosted(theirs)
        x = torch.randn(2, 20, 32, generator=g)
        context = None if context_dim is None else torch.randn(2, 7, context_dim, generator=g)
        with torch.no_grad():
            assert rel_err(ours(x, context), theirs(x, context)) < 1e-5


def test_transformer_block_matches_diffusers():
    ours = BasicTransformerBlock(32, 4, 8, 24)
    theirs = DBasicTransformerBlock(32, 4, 8, cross_attention_dim=24, activation_fn="geglu")
    share_weights(ours, theirs)
    boosted(ours)
    boosted(theirs)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 20, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        assert rel_err(ours(x, context), theirs(x, encoder_hidden_states=context)) < 1e-5


@pytest.mark.parametrize("linear", [False, True])
def test_transformer2d_matches_diffusers(linear):
    ours = Transformer2D(32, 2, 16, 24, depth=2, groups=8, linear=linear, upcast=True)
    theirs = Transformer2DModel(2, 16, in_channels=32, num_layers=2, cross_attention_dim=24, norm_num_groups=8,
                                use_linear_projection=linear, upcast_attention=True)
    share_weights(ours, theirs)
    boosted(ours)
    boosted(theirs)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 32, 6, 5, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        out = ours(x, context)
        assert out.is_contiguous()
        assert rel_err(out, theirs(x, encoder_hidden_states=context).sample) < 1e-5


def test_vae_spatial_attention_matches_diffusers():
    ours = SpatialSelfAttention(32, groups=8)
    theirs = DAttention(32, heads=1, dim_head=32, norm_num_groups=8, eps=1e-6, residual_connection=True,
                        bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    share_weights(ours, theirs)
    boosted(ours)
    boosted(theirs)
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-5


def test_cross_attention_kv_cache_is_exact():
    """Without autograd the context's K/V are reused across calls; a changed context (even in place) or
    changed weights must give what a fresh computation gives."""
    torch.manual_seed(5)
    attn = Attention(32, 24, heads=4, head_dim=8).eval()
    x, context = torch.randn(2, 20, 32), torch.randn(2, 7, 24)

    def fresh(context):
        Attention.cache_kv = False
        try:
            return attn(x, context)
        finally:
            Attention.cache_kv = True

    with torch.no_grad():
        first = attn(x, context)
        assert torch.equal(attn(x, context.clone()), first)
        context.mul_(2.0)
        assert torch.equal(attn(x, context), fresh(context))
        attn.to_v.weight.mul_(0.5)
        assert torch.equal(attn(x, context), fresh(context))
        assert not torch.equal(attn(x, context), first)
    grad_context = context.clone().requires_grad_(True)
    attn(x, grad_context).sum().backward()  # with autograd the cache is bypassed and gradients flow
    assert grad_context.grad is not None and grad_context.grad.abs().sum() > 0


def test_kv_cache_follows_parametrized_weights():
    """A parametrized projection (LoRA works this way) computes its weight on every read; its scale may
    change between calls without any parameter changing, so its K/V must not come from the cache."""
    from torch.nn.utils import parametrize

    class Scaled(torch.nn.Module):
        factor = 1.0

        def forward(self, w):
            return w * self.factor

    torch.manual_seed(6)
    attn = Attention(32, 24, heads=4, head_dim=8).eval()
    scaled = Scaled()
    parametrize.register_parametrization(attn.to_v, "weight", scaled)
    x, context = torch.randn(2, 20, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        before = attn(x, context)
        scaled.factor = 2.0
        after = attn(x, context)
    assert not torch.allclose(before, after)
