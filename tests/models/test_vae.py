"""AutoencoderKL: parity with diffusers on shared random weights, tiling, the latent distribution, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DAutoencoderKL
from model_parity import rel_err, share_weights

from ldm.models import AutoencoderKL, DiagonalGaussian, VAEConfig
from ldm.models.vae import apply_tiled

pytestmark = pytest.mark.usefixtures("single_thread")  # many small ops: threads cost more than they save

TOL = 1e-4
TINY = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_pair(config: VAEConfig = TINY, seed: int = 0):
    ours, theirs = AutoencoderKL(config), DAutoencoderKL(**config.to_dict())
    share_weights(ours, theirs, seed)
    return ours, theirs


def assert_matches(ours, theirs, x, z):
    """ldm's and diffusers' VAEs agree on the posterior of x and the decode of z."""
    with torch.no_grad():
        ref = theirs.encode(x).latent_dist
        post = ours.encode(x)
        assert rel_err(post.mean, ref.mean) < TOL
        assert rel_err(post.logvar, ref.logvar) < TOL
        assert rel_err(ours.decode(z), theirs.decode(z).sample) < TOL


def test_encode_decode_match_diffusers():
    ours, theirs = build_pair()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 16, generator=g) * 2 - 1
    z = torch.randn(2, 4, 12, 8, generator=g)
    assert_matches(ours, theirs, x, z)


def test_tiling_reassembles_a_local_map_exactly():
    """For a map with no spatial context (here 2x nearest upsampling, affine per pixel) every tile computes
    the true values, so blending and cropping must give back fn(whole) exactly, odd sizes included."""
    def fn(t):
        return F.interpolate(t, scale_factor=2.0, mode="nearest") * 3.0 - 1.0

    z = torch.randn(2, 4, 37, 45, generator=torch.Generator().manual_seed(8))
    out = apply_tiled(fn, z, 16, 32)
    assert out.shape == (2, 4, 74, 90)
    torch.testing.assert_close(out, fn(z))


def test_tiled_decode_agrees_with_untiled_and_with_diffusers():
    ours, theirs = build_pair(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                        sample_size=32, mid_block_add_attention=False))
    with torch.no_grad():  # damp the residual branches: a local decoder, as trained VAEs are
        for name, p in ours.named_parameters():
            if "conv2" in name:
                p.mul_(0.05)
    theirs.load_state_dict(ours.state_dict())
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(2))  # 80x80 px, tiles of 32 px
    with torch.no_grad():
        whole = ours.decode(z)
        ours.set_tiling(True)
        theirs.enable_tiling()
        tiled = ours.decode(z)
        assert tiled.shape == whole.shape == (1, 3, 80, 80)
        assert rel_err(tiled, theirs.decode(z).sample) < TOL
        # Each tile sees zero padding at its borders and normalises with its own statistics, so tiled only
        # approximates untiled: loosely everywhere, and better in the mean.
        assert rel_err(tiled, whole) < 0.25
        assert (tiled - whole).abs().mean() < 0.15 * whole.abs().mean()
        ours.set_tiling(False)
        assert torch.equal(ours.decode(z), whole)


def test_tiled_encode_matches_diffusers():
    ours, theirs = build_pair()
    ours.set_tiling(True)
    theirs.enable_tiling()
    x = torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        assert post.mean.shape == (1, 4, 36, 28)
        assert rel_err(post.mean, theirs.encode(x).latent_dist.mean) < TOL


def test_tile_size_is_checked():
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="tile_size=13"):
        vae.set_tiling(True, tile_size=13)


def test_diagonal_gaussian():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    moments[:, 4:] = moments[:, 4:].clamp(-3, 3)
    dist = DiagonalGaussian(moments)
    assert torch.equal(dist.mode(), moments[:, :4])
    torch.testing.assert_close(dist.std, torch.exp(0.5 * moments[:, 4:]))
    a = dist.sample(torch.Generator().manual_seed(5))
    b = dist.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, dist.mean + dist.std * noise)
    # KL(N(μ, σ²) || N(0, 1)) summed over latent elements, checked against torch.distributions.
    q = torch.distributions.Normal(dist.mean, dist.std)
    p = torch.distributions.Normal(torch.zeros_like(dist.mean), torch.ones_like(dist.std))
    torch.testing.assert_close(dist.kl(), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)))
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 99.0)], dim=1))
    assert clamped.logvar.max() == 20.0


def test_decode_dtype():
    vae = AutoencoderKL(TINY).to(torch.bfloat16)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = vae.decode(z)
        assert out.dtype == torch.float32
        assert vae.decoder.conv_in.weight.dtype == torch.float32  # upcast once, in place
        assert vae.encoder.conv_in.weight.dtype == torch.bfloat16
        assert vae.decode(z, dtype=torch.bfloat16).dtype == torch.bfloat16
        assert vae.encode(torch.zeros(1, 3, 16, 16)).mean.dtype == torch.float32


def test_config_round_trip_and_errors():
    theirs = DAutoencoderKL(**TINY.to_dict())
    assert VAEConfig.from_dict(json.loads(json.dumps(dict(theirs.config)))) == TINY
    assert VAEConfig().downscale == 8 and TINY.downscale == 2
    with pytest.raises(ValueError, match="unknown key.*fancy"):
        VAEConfig.from_dict({"fancy": True})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig(block_out_channels=(16, 32), norm_num_groups=8, down_block_types=("AttnDownEncoderBlock2D",) * 2)


@pytest.mark.slow
def test_full_size_sd_vae_matches_diffusers():
    config = VAEConfig()
    with torch.device("meta"):
        ours, theirs = AutoencoderKL(config), DAutoencoderKL(**config.to_dict())
    share_weights(ours, theirs, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert_matches(ours, theirs, x, z)
