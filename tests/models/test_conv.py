"""ldm.models.conv: the prepacked-weight convolution (plain and lean) and the token projections equal their plain
forms."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F

from proc_maps import resident_kb_of_mapping  # noqa: E402
from ldm.models.conv import Conv2d, map_to_tokens, pack_for_inference, tokens_in, tokens_out, tokens_to_map, unpack

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
    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = conv(x)
    clone = copy.deepcopy(conv)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected)


# ---------------------------------------------------------------- lean layers (pack_for_inference)

def _lean_pair(seed=4, cin=8, cout=12, kernel=3, padding=1):
    """A lean Conv2d and an untouched plain twin with the same weights."""
    torch.manual_seed(seed)
    conv = Conv2d(cin, cout, kernel, padding=padding)
    twin = torch.nn.Conv2d(cin, cout, kernel, padding=padding)
    twin.load_state_dict(conv.state_dict())
    return pack_for_inference(conv), twin


def _released(conv: Conv2d) -> bool:
    return conv._plain_weight().untyped_storage().nbytes() == 0


def test_lean_layer_releases_weight_and_gives_it_back_exactly():
    conv, twin = _lean_pair()
    weight, bias = conv.weight, conv.bias
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out = conv(x)
        assert _released(conv)                     # one copy left: the packed one
        torch.testing.assert_close(conv(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-5)
    state = conv.state_dict()
    assert not _released(conv)
    assert torch.equal(state["weight"], twin.weight) and torch.equal(state["bias"], twin.bias)
    assert [id(p) for p in conv.parameters()] == [id(weight), id(bias)]
    assert conv.weight is weight and conv.bias is bias


def test_stale_weight_reference_fails_on_shape_and_gets_its_values_back():
    # An optimizer built before a lean forward holds the Parameter: its step must fail loudly (not read freed
    # memory), and the same Parameter has its values again once the module hands the weight out.
    conv, twin = _lean_pair()
    stale = conv.weight
    with torch.no_grad():
        conv(torch.randn(1, 8, 6, 6))
    with pytest.raises(RuntimeError):
        torch.matmul(stale.detach().view(12, -1), torch.ones(72, 1))
    assert conv.weight is stale and torch.equal(stale, twin.weight)


@pytest.mark.parametrize("read", [
    lambda c: c.weight.clone(),
    lambda c: dict(c.named_parameters())["weight"].clone(),
    lambda c: [p.clone() for p in c.parameters()][0],
    lambda c: copy.deepcopy(c).weight.clone(),
    lambda c: _pickled(c).weight.clone(),
    lambda c: c.double().weight.float(),
])
def test_every_module_read_of_a_released_weight_sees_its_values(read):
    conv, twin = _lean_pair(seed=5)
    with torch.no_grad():
        conv(torch.randn(1, 8, 5, 5))
    assert _released(conv)
    assert torch.equal(read(conv), twin.weight.detach())


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_lean_layer_on_new_shapes_and_big_maps_matches_nn_conv():
    conv, twin = _lean_pair(seed=6)
    shapes = [(1, 8, 6, 6), (2, 8, 4, 7), (1, 8, 40, 40), (1, 8, 6, 6)]   # 40x40 > PACK_MAX_POSITIONS
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            torch.testing.assert_close(conv(x), twin(x), rtol=1e-5, atol=1e-5)
            assert _released(conv) == (shape[2] * shape[3] * shape[0] <= 1024)
    assert torch.equal(conv.weight, twin.weight)


def test_training_after_lean_inference_matches_plain_training():
    """An optimizer made before packing keeps working: the grad-enabled forward restores the weight into the
    same Parameter, and also after inference under torch.inference_mode the weight takes part in autograd."""
    conv, twin = _lean_pair(seed=7)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (conv, twin))
    x = torch.randn(2, 8, 5, 5)
    for step in range(2):
        with torch.inference_mode() if step else torch.no_grad():
            conv(x)
        assert _released(conv)
        for module, optimizer in ((conv, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()
        assert not conv.weight.is_inference()
        torch.testing.assert_close(conv.weight, twin.weight, rtol=1e-6, atol=1e-6)


def test_load_state_dict_parametrization_and_unpack_on_a_lean_layer():
    from torch.nn.utils import parametrize

    conv, twin = _lean_pair(seed=8)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict({"weight": 2 * twin.weight, "bias": twin.bias})
        torch.testing.assert_close(conv(x), F.conv2d(x, 2 * twin.weight, twin.bias, padding=1),
                                   rtol=1e-5, atol=1e-5)
        assert _released(conv)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(conv, "weight", Double())   # as ldm.lora does
    assert torch.equal(conv.parametrizations.weight.original, 2 * twin.weight)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, 4 * twin.weight, twin.bias, padding=1),
                                   rtol=1e-5, atol=1e-5)
    parametrize.remove_parametrizations(conv, "weight")
    with torch.no_grad():
        conv(x)
        assert _released(conv)
        unpack(conv)
        assert not _released(conv) and torch.equal(conv._plain_weight(), 4 * twin.weight)
        conv(x)
        assert not _released(conv)                   # not lean any more: packed copy beside the plain weight


def test_pack_for_inference_reaches_nested_layers():
    torch.manual_seed(9)
    net = torch.nn.Sequential(Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), Conv2d(8, 4, 1))
    plain = copy.deepcopy(net)
    pack_for_inference(net)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-5)
    assert all(_released(m) for m in net if isinstance(m, Conv2d))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_lean_layer_with_file_mapped_weights_gives_back_the_pages(tmp_path):
    """safetensors loads weights as views of the mapped file: releasing such a weight must still take its pages
    out of the resident memory, and the values must come back unchanged."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(10)
    conv = Conv2d(512, 512, 3, padding=1)                       # 9 MB of weight
    twin = copy.deepcopy(conv)
    path = tmp_path / "conv.safetensors"
    save_file(conv.state_dict(), str(path))
    conv.load_state_dict(load_file(str(path)), assign=True)
    assert not conv.weight.untyped_storage().resizable()        # a view of the file, not torch's memory
    pack_for_inference(conv)
    x = torch.randn(1, 512, 4, 4)
    with torch.no_grad():
        conv._plain_weight().sum()                              # the file pages are resident now
        assert resident_kb_of_mapping(path) > 8000
        torch.testing.assert_close(conv(x), twin(x), rtol=1e-4, atol=1e-4)
    assert resident_kb_of_mapping(path) < 100                  # only the pages shared with the bias/header
    assert torch.equal(conv.state_dict()["weight"], twin.weight)


def test_lean_unet_gives_the_same_output_bitwise_and_the_same_state_dict():
    """A whole (tiny) U-Net, lean: the same kernels on the same packed weights, so the same bits as the default
    path; the state dict and the parameter objects are the original ones afterwards."""
    from ldm.models.unet import UNet, UNetConfig

    torch.manual_seed(11)
    cfg = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
    unet = UNet(cfg).eval()
    reference = copy.deepcopy(unet)
    params = list(unet.parameters())
    pack_for_inference(unet)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        outputs = [unet(x, torch.tensor([t]), context) for t in (999.0, 500.0)]
        expected = [reference(x, torch.tensor([t]), context) for t in (999.0, 500.0)]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert sum(_released(m) for m in unet.modules() if isinstance(m, Conv2d)) >= 8
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.state_dict().values()))
    assert all(a is b for a, b in zip(unet.parameters(), params))


def test_bf16_runs_packed_lean_and_matches_nn_conv():
    torch.manual_seed(0)
    conv = pack_for_inference(Conv2d(16, 32, 3, padding=1).to(torch.bfloat16))
    plain = copy.deepcopy(conv.weight.detach()), conv.bias.detach().clone()
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    expected = F.conv2d(x.float(), plain[0].float(), plain[1].float(), 1, 1)
    with torch.no_grad():
        for layout in (torch.contiguous_format, CL):
            out = conv(x.contiguous(memory_format=layout))
            assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=layout)
            torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)   # bf16 rounding
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert conv.__dict__.get("_released")                      # the packed bf16 copy is the only one
    else:   # oneDNN has no bf16 kernels on this CPU (AVX2 only): the layer stays a plain nn.Conv2d, unpacked
        assert not conv.__dict__.get("_released")
    assert torch.equal(conv.weight, plain[0])                       # and gives the weight back exactly


def test_inference_layout_is_channels_last_only_for_cpu_inference():
    from ldm.models.conv import inference_layout

    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert inference_layout(x).is_contiguous(memory_format=CL) and not inference_layout(x).is_contiguous()
        Conv2d.channels_last = False
        try:
            assert inference_layout(x) is x
        finally:
            Conv2d.channels_last = True
    assert inference_layout(x) is x                                 # autograd: the layout training always had


def test_a_layer_can_set_its_own_packing_limit():
    # scripts/bench_conv.py times one layer both ways on the same map; the module's limit is left alone.
    from ldm.models import conv as conv_module

    layer = Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 40, 40)                       # 1,600 positions, above PACK_MAX_POSITIONS
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
        layer(x)
        assert layer.__dict__.get("_packed") is None    # the module's limit: plain nn.Conv2d
        layer.pack_max_positions = 10**6
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert layer.__dict__.get("_packed") is not None
        other = Conv2d(8, 8, 3, padding=1).eval()
        other(x)
        assert other.__dict__.get("_packed") is None and conv_module.PACK_MAX_POSITIONS == 1024
