"""The forward/reverse figure on a pixel-space model that knows its data (tests/wiener.py)."""

import numpy as np
import pytest
import torch

from ldm.pipeline.visualize import forward_reverse, forward_reverse_figure
from ldm.schedules import NoiseSchedule
from wiener import SIZE, smooth_fields, wiener

TS = (0, 250, 500, 999)


def high_frequency_energy(x: torch.Tensor) -> float:
    """Mean squared difference between neighbouring pixels: ~2 for white noise, small for smooth fields."""
    return float(((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean())


def test_rows_go_from_data_to_noise_and_back():
    schedule = NoiseSchedule()
    x0 = smooth_fields(1, seed=3)
    forward, reverse = forward_reverse(schedule, wiener, x0, timesteps=TS, steps=40, seed=0)
    assert len(forward) == len(reverse) == len(TS)
    assert all(x.shape == x0.shape for x in forward + reverse)
    assert (forward[0] - x0).abs().max() < 0.15  # t = 0: the image itself (σ_0 ≈ 0.03)
    smooth, noise = high_frequency_energy(x0), 2.0
    for row in (forward, reverse):
        assert abs(high_frequency_energy(row[-1]) - noise) < 0.3  # t = 999: (almost) pure VP noise
    roughness = [high_frequency_energy(x) for x in reverse]
    assert roughness == sorted(roughness)  # the reverse run gets smoother at every shown t
    assert high_frequency_energy(reverse[0]) < 2 * smooth  # and ends on a sample that looks like the data
    assert 0.15 < float(reverse[0].std()) < 0.5  # with the data's scale (std about 0.3)


def test_figure_layout_and_bad_input():
    schedule = NoiseSchedule()
    x0 = smooth_fields(1, seed=3)
    figure = forward_reverse_figure(schedule, wiener, x0, timesteps=TS, steps=8, cell=40)
    assert figure.size == (80 + 4 * 40, 18 + 2 * 40) and figure.mode == "RGB"
    bare = forward_reverse_figure(schedule, wiener, x0[:, :1], timesteps=TS, steps=8, cell=SIZE, labels=False)
    pixels = np.asarray(bare)
    assert bare.size == (4 * SIZE, 2 * SIZE) and (pixels[..., 0] == pixels[..., 2]).all()  # grey for 1 channel
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        forward_reverse(schedule, wiener, x0, timesteps=(0, 1000))
    with pytest.raises(ValueError, match="one sample shaped"):
        forward_reverse(schedule, wiener, smooth_fields(2, seed=0))
