"""The VAE stage's loss: L1 + L2 of the reconstruction, and the chroma term that charges colour errors again."""

import pytest
import torch

from ldm.models.vae import AutoencoderKL, VAEConfig
from ldm.train.config import load_config
from ldm.train.stages import VAEStage, chroma_distance


def _loss(offset: tuple[float, float, float], chroma_weight: float) -> float:
    """The stage's loss when every reconstructed pixel is the input plus ``offset`` (RGB, in [-1, 1] units)."""
    cfg = load_config(None, ["stage=vae", f"vae_loss.chroma_weight={chroma_weight}", "vae_loss.kl_weight=0"])
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))
    stage = VAEStage(cfg, vae)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    shift = torch.tensor(offset).view(1, 3, 1, 1)
    batch = {"pixels": x, "seed": [0, 1]}
    return float(stage.loss(lambda x, noise: (x + shift, torch.zeros(len(x))), batch, "cpu"))


def test_a_grey_error_costs_no_more_with_the_chroma_term():
    # (up to 4 × the 1e-6 that keeps the gradient finite)
    assert _loss((0.1, 0.1, 0.1), 4.0) == pytest.approx(_loss((0.1, 0.1, 0.1), 0.0), abs=1e-5)


def test_a_colour_error_costs_its_chroma_length_again_times_the_weight():
    # err = (0, 0.1, 0): its grey part is 0.1/3 per channel, its colour part (-1, 2, -1)·0.1/3, of length 0.1·√(2/3).
    d = 0.1 * (2 / 3) ** 0.5
    base = _loss((0.0, 0.1, 0.0), 0.0)
    assert base == pytest.approx(0.1 / 3 + 0.01 / 3, rel=1e-5)            # L1 + L2 means over the 3 channels
    assert _loss((0.0, 0.1, 0.0), 4.0) - base == pytest.approx(4.0 * (d + d * d), rel=1e-4)


def test_chroma_distance_is_zero_for_grey_and_has_a_finite_gradient_there():
    err = torch.zeros(1, 3, 2, 2, requires_grad=True)
    d = chroma_distance(err)
    d.sum().backward()
    assert torch.allclose(d, torch.full_like(d, 1e-6)) and torch.isfinite(err.grad).all()
    green = torch.tensor([-0.5, 1.0, -0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(chroma_distance(green), torch.full((1, 2, 2), 1.5 ** 0.5))
