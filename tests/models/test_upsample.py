"""The sub-pixel upsampler (ldm/models/upsample.py) draws what nearest-upsample-then-convolve draws."""

import pytest
import torch
import torch.nn.functional as F

from ldm.models.upsample import Upsample, fold_weight, subpixel_upsample_conv


def _reference(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    """diffusers' Upsample2D: nearest 2x, then the 3x3 convolution, in float64."""
    return F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), up.conv.weight.double(),
                    up.conv.bias.double(), padding=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 20, 24), (1, 8, 17, 33)])   # odd sides: the padded edges
def test_subpixel_matches_upsample_then_conv(shape, channels_last):
    torch.manual_seed(0)
    up = Upsample(shape[1])
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert up._subpixel_applies(x, None)
        y = up(x)
    assert y.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y.double(), _reference(up, x), rtol=0, atol=1e-5)


def test_bfloat16_drift_stays_near_the_plain_bf16_path():
    # The folded weights are sums of 1-4 taps, rounded to bf16 once more: measured 1.7x the plain path's mean
    # error at this layer (images: docs/benchmarks.md); a wrong fold would be off by orders of magnitude.
    torch.manual_seed(1)
    up = Upsample(16).to(torch.bfloat16)
    x = torch.randn(1, 16, 24, 24, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = _reference(up, x)
    with torch.no_grad():
        fast = up(x).double()
        Upsample.subpixel = False
        try:
            plain = up(x).double()
        finally:
            Upsample.subpixel = True
    assert (fast - ref).abs().mean() <= 2.0 * (plain - ref).abs().mean()


def test_small_maps_autograd_and_odd_targets_take_the_plain_path():
    up = Upsample(4)
    small = torch.randn(1, 4, 8, 8)            # 16x16 output: the packed Conv2d's range
    big = torch.randn(1, 4, 20, 20)
    with torch.no_grad():
        assert not up._subpixel_applies(small, None)
        assert not up._subpixel_applies(big, (41, 40))   # upsampling to an odd skip size
        assert up._subpixel_applies(big, (40, 40))
    assert not up._subpixel_applies(big, None)           # autograd on: gradients exactly as diffusers'
    y = up(big)
    y.sum().backward()
    assert up.conv.weight.grad is not None


@pytest.mark.parametrize("side", [8, 16, 24])   # 16² (plain path), 32² (the threshold), 48² upsampled
def test_an_images_path_does_not_depend_on_its_batch(side):
    # The sub-pixel and plain paths round differently: the choice is made per image, so row 3 of a batch of 8
    # is bitwise row 3 of a batch of 2 (an 8-row call of 8x8 maps has 2,048 upsampled positions, 2 rows 512).
    # Two rows, not one: the Pipeline never calls with a single row, whose kernels are other ones.
    torch.manual_seed(3)
    up = Upsample(16)
    x = torch.randn(8, 16, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert up._subpixel_applies(x, None) == up._subpixel_applies(x[2:4], None) == (side >= 16)
        assert torch.equal(up(x)[3], up(x[2:4])[1])


def test_folded_kernel_follows_weight_updates():
    torch.manual_seed(2)
    up = Upsample(4)
    x = torch.randn(1, 4, 20, 20)
    with torch.no_grad():
        up(x)
        up.conv.weight.mul_(2.0)   # an in-place update (a LoRA merge does this) must not reuse the old fold
        y = up(x)
    torch.testing.assert_close(y.double(), _reference(up, x), rtol=0, atol=1e-5)


def test_fold_weight_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3"):
        fold_weight(torch.zeros(4, 4, 1, 1))
    folded = fold_weight(torch.ones(2, 3, 3, 3))
    # Phase (0, 0): the top-left tap alone, a 2x1 column sum, a 1x2 row sum and the 2x2 block sum.
    assert folded[0, 0].tolist() == [[1.0, 2.0], [2.0, 4.0]]
    x = torch.randn(1, 3, 5, 5)
    assert subpixel_upsample_conv(x, folded, None).shape == (1, 2, 10, 10)


def test_a_traced_graph_takes_the_subpixel_form_in_plain_operators():
    # what OpenVINO's converter records (torch.jit.trace): conv, crops, stack, pixel_shuffle; no strided writes
    torch.manual_seed(0)
    up = Upsample(8).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        up._folded()
        traced = torch.jit.trace(up, (x,), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::pixel_shuffle" in kinds and "aten::upsample_nearest2d" not in kinds
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
