"""UNet: parity with diffusers' UNet2DConditionModel on shared random weights, config round trips, backends,
gradient checkpointing."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from model_parity import rel_err, share_weights

from ldm.models import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # many small ops: threads cost more than they save

TOL = 1e-4


def tiny_config(**overrides) -> UNetConfig:
    """Two levels, cross-attention on the top one, as SD 1.x is laid out."""
    base = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
    return UNetConfig(**{**base, **overrides})


CONFIGS = {
    "sd1": tiny_config(),
    "sd1_groups32": tiny_config(norm_num_groups=32, layers_per_block=2),
    # SD 2.x style: 16 channels per head (attention_head_dim lists head counts), linear projections, upcast
    "sd2": tiny_config(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                       cross_attention_dim=48, transformer_layers_per_block=(2, 1),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "inpaint": tiny_config(in_channels=9),
}


def build_pair(config: UNetConfig, seed: int = 0) -> tuple[UNet, UNet2DConditionModel]:
    ours, theirs = UNet(config), UNet2DConditionModel(**config.to_dict())
    share_weights(ours, theirs, seed)
    return ours, theirs


def inputs(config: UNetConfig, batch=2, size=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    t = torch.tensor([3.0, 917.5, 400.0][:batch])
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    ours, theirs = build_pair(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    x, t, context = inputs(config)
    with torch.no_grad():
        ref = theirs(x, t, context).sample
        out = ours(x, t, context)
    assert rel_err(out, ref) < TOL


def test_odd_latent_size_and_scalar_timestep():
    """Sides that are not multiples of 2^levels follow the skip tensors' sizes; a scalar t broadcasts."""
    config = CONFIGS["sd1"]
    ours, theirs = build_pair(config)
    x, _, context = inputs(config, batch=2, size=(9, 7))
    with torch.no_grad():
        ref = theirs(x, 250, context).sample
        out = ours(x, torch.tensor(250.0), context)
        batched = ours(x, torch.tensor([250.0, 250.0]), context)
    assert out.shape == (2, 4, 9, 7)
    assert rel_err(out, ref) < TOL
    torch.testing.assert_close(out, batched)


def test_timestep_shape_is_checked():
    ours = UNet(CONFIGS["sd1"])
    x, _, context = inputs(CONFIGS["sd1"])
    with pytest.raises(ValueError, match="t must be a scalar"):
        ours(x, torch.tensor([1.0, 2.0, 3.0]), context)


def test_attention_backends_agree():
    config = CONFIGS["sd2"]
    ours, _ = build_pair(config)
    x, t, context = inputs(config)
    with torch.no_grad():
        ref = ours(x, t, context)
        for slice_size in (None, 1, 3):
            ours.set_attention_backend("sliced", slice_size)
            assert rel_err(ours(x, t, context), ref) < 1e-5
        ours.set_attention_backend("sdpa")
        assert torch.equal(ours(x, t, context), ref)


def test_unknown_backend_and_missing_xformers():
    ours = UNet(CONFIGS["sd1"])
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("flash9")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match=r"pip install ldm-diffusion\[xformers\]"):
            ours.set_attention_backend("xformers")
    else:
        ours.set_attention_backend("xformers")


def test_gradient_checkpointing_same_gradients():
    config = CONFIGS["sd1"]
    ours, _ = build_pair(config)
    x, t, context = inputs(config)
    context.requires_grad_(True)

    def grads():
        ours.zero_grad()
        context.grad = None
        (ours(x, t, context) ** 2).mean().backward()
        return [p.grad.clone() for p in ours.parameters()] + [context.grad.clone()]

    plain = grads()
    ours.set_gradient_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ours.modules())
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    config = CONFIGS[name]
    theirs = UNet2DConditionModel(**config.to_dict())
    again = UNetConfig.from_dict(json.loads(json.dumps(dict(theirs.config))))
    assert again == config


def test_num_attention_heads_is_written_as_diffusers_head_count():
    config = tiny_config(attention_head_dim=99, num_attention_heads=(4, 8))
    assert config.heads() == (4, 8)
    d = config.to_dict()
    assert d["attention_head_dim"] == [4, 8] and d["num_attention_heads"] is None
    ours, theirs = UNet(config), UNet2DConditionModel(**d)
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6 era, as published)
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_EXTRA = {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
              "upcast_attention": True, "dual_cross_attention": False, "num_class_embeds": None,
              "only_cross_attention": False, "class_embed_type": None, "resnet_time_scale_shift": "default"}


def test_published_configs_parse():
    sd15 = UNetConfig.from_dict(SD15_CONFIG)
    assert sd15 == UNetConfig()
    sd21 = UNetConfig.from_dict({**SD15_CONFIG, **SD21_EXTRA})
    assert sd21.heads() == (5, 10, 20, 20)
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.heads())] == [64] * 4


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                                        ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", [True, False])])
def test_unsupported_config_keys_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict({**SD15_CONFIG, key: value})


def test_bad_config_values():
    with pytest.raises(ValueError, match="unknown key.*sprinkles"):
        UNetConfig.from_dict({**SD15_CONFIG, "sprinkles": 3})
    with pytest.raises(ValueError, match="UNetMidBlock2DSimpleCrossAttn"):
        UNetConfig.from_dict({**SD15_CONFIG, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        dataclasses.replace(CONFIGS["sd1"], down_block_types=("AttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match="attention_head_dim"):
        tiny_config(attention_head_dim=(8, 8, 8))
    with pytest.raises(ValueError, match="heads"):
        tiny_config(attention_head_dim=5)


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers():
    config = UNetConfig.from_dict(SD15_CONFIG)
    with torch.device("meta"):
        ours, theirs = UNet(config), UNet2DConditionModel(**config.to_dict())
    share_weights(ours, theirs, seed=3, tie_big=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ref = theirs(x, torch.tensor([421.0]), context).sample
        out = ours(x, torch.tensor([421.0]), context)
    assert rel_err(out, ref) < TOL


def test_channels_last_input_and_plain_convolutions_agree():
    """The fast paths (prepacked convolutions, channels-last token views) change nothing but speed."""
    from ldm.models.conv import Conv2d

    config = CONFIGS["sd2"]
    ours, _ = build_pair(config)
    x, t, context = inputs(config)
    with torch.no_grad():
        ref = ours(x, t, context)
        assert rel_err(ours(x.contiguous(memory_format=torch.channels_last), t, context), ref) < 1e-5
        Conv2d.prepack = False
        try:
            assert rel_err(ours(x, t, context), ref) < 1e-5
        finally:
            Conv2d.prepack = True
