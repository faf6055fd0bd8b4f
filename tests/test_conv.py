"""ldm.models.conv: the prepacked-weight convolution and the token projections equal their plain forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models.conv import Conv2d, map_to_tokens, tokens_in, tokens_out, tokens_to_map

pytestmark = pytest.mark.usefixtures("single_thread")

CL = torch.channels_last


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)])
def test_conv_matches_functional_conv_in_both_layouts(kernel, stride, padding):
    torch.manual_seed(0)
    conv = Conv2d(6, 10, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 6, 9, 7)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    with torch.no_grad():
        out = conv(x)
        out_cl = conv(x.contiguous(memory_format=CL))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cl, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()
    assert out_cl.is_contiguous(memory_format=CL)


def test_conv_follows_weight_changes_and_autograd():
    torch.manual_seed(1)
    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(-2.0)  # in place: the packed copy must be remade
        torch.testing.assert_close(conv(x), -2.0 * (first - conv.bias[:, None, None]) + conv.bias[:, None, None],
                                   rtol=1e-5, atol=1e-5)
        conv.load_state_dict({"weight": torch.zeros(4, 4, 3, 3), "bias": torch.ones(4)})
        assert torch.equal(conv(x), torch.ones(1, 4, 5, 5))
    x.requires_grad_(True)
    conv(x).sum().backward()  # with autograd it is nn.Conv2d
    assert x.grad is not None


def test_prepack_switch_gives_same_result():
    torch.manual_seed(2)
    conv = Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fast = conv(x)
        Conv2d.prepack = False
        try:
            plain = conv(x)
        finally:
            Conv2d.prepack = True
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_token_projections(layout):
    torch.manual_seed(3)
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=layout)
    w_in, b_in = torch.randn(8, 6, 1, 1), torch.randn(8)
    w_out, b_out = torch.randn(6, 8), torch.randn(6)
    tokens = tokens_in(x, w_in, b_in)
    expected = F.conv2d(x, w_in, b_in).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    back = tokens_out(tokens, w_out, b_out, x)
    torch.testing.assert_close(back, F.conv2d(F.conv2d(x, w_in, b_in), w_out[:, :, None, None], b_out),
                               rtol=1e-5, atol=1e-4)
    assert back.is_contiguous(memory_format=layout)
    torch.testing.assert_close(tokens_to_map(map_to_tokens(x), x), x)
    torch.testing.assert_close(map_to_tokens(x), x.flatten(2).transpose(1, 2))


def test_copy_and_pickle_after_inference():
    """The packed weights are opaque oneDNN tensors; deepcopy (EMA) and torch.save must still work."""
    import copy
    import io

    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = conv(x)
    clone = copy.deepcopy(conv)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected)
