"""Control files by their keys alone: ControlNet in diffusers' single-file layout and as a "difference" file,
T2I-Adapters, and every file that is not a control unit for this model: one CheckpointError naming the file and
what it is."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from control_fixtures import tiny_controlnet, tiny_t2i_adapter, write_original_controlnet
from ldm.checkpoints import CheckpointError
from ldm.checkpoints.control import load_control
from ldm.models.controlnet import ControlNet
from ldm.models.t2i_adapter import T2IAdapter
from ldm.models.unet import UNet, UNetConfig
from tiny_models import tiny_unet_config
from tiny_sdxl import tiny_sdxl_unet_config


@pytest.fixture(scope="module")
def unets():
    """The tiny SD 1.x U-Net as diffusers builds it, and ldm's with the same weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**tiny_unet_config("sd1")).eval()
    ours = UNet(UNetConfig.from_dict(tiny_unet_config("sd1")))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def same(module, reference) -> bool:
    a, b = module.state_dict(), reference.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_controlnet_in_diffusers_single_file_layout(unets, tmp_path):
    net = tiny_controlnet(unets[0])
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = load_control(path, unets[1])
    assert isinstance(model, ControlNet) and same(model, net)
    assert model.config.to_dict()["conditioning_embedding_out_channels"] == [16, 32]


def test_difference_controlnet_gets_the_base_weights_added(unets, tmp_path):
    """A "difference" file stores its U-Net copy as (ControlNet − base U-Net); loading adds the base back."""
    net = tiny_controlnet(unets[0])
    base = unets[1].state_dict()
    diff = type(net).from_config(net.config)
    diff.load_state_dict({k: v - base[k] if k in base else v for k, v in net.state_dict().items()})
    path = write_original_controlnet(diff, tmp_path / "control_diff.pth")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "difference": torch.tensor([])}, path)
    model = load_control(path, unets[1])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="control_diff.pth: a 'difference' ControlNet needs the base model"):
        load_control(path)


def test_t2i_adapter_in_diffusers_single_file_layout(unets, tmp_path):
    adapter = tiny_t2i_adapter(unets[0])
    path = tmp_path / "t2i.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path))
    model = load_control(path, unets[1], latent_factor=2)
    assert isinstance(model, T2IAdapter) and same(model, adapter)
    assert model.config.to_dict() == {k: (list(v) if isinstance(v, tuple) else v) for k, v in adapter.config.items()
                                      if not k.startswith("_")}


def test_a_control_unit_for_another_family_is_refused(unets, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    xl = ControlNetModel.from_unet(UNet2DConditionModel(**tiny_sdxl_unet_config()),
                                   conditioning_embedding_out_channels=(16, 32))
    path = tmp_path / "controlnet_xl.safetensors"
    save_file({k: v.contiguous() for k, v in xl.state_dict().items()}, str(path))
    assert isinstance(load_control(path), ControlNet)   # fine on its own: the SDXL ControlNet is read
    with pytest.raises(CheckpointError, match="controlnet_xl.safetensors: a ControlNet for SDXL; this pipeline's "
                                              "model is"):
        load_control(path, unets[1])
    path = tmp_path / "t2i_xl.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_t2i_adapter(unets[0]).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="t2i_xl.safetensors: a T2I-Adapter for SDXL"):
        load_control(path, unets[1], latent_factor=1)   # unshuffling by twice the latent factor: SDXL's adapter


def files(tmp_path):
    """(file, what the error must say) for files that are not control units."""
    cases = {
        "lora.safetensors": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "this is a LoRA"),
        "peft.safetensors": ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, "this is a LoRA"),
        "sd15.safetensors": ({"model.diffusion_model.out.2.weight": torch.zeros(4)},
                             "a Stable Diffusion checkpoint"),
        "ip-adapter.safetensors": ({"image_proj.proj.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight":
                                    torch.zeros(4, 4)}, "an IP-Adapter"),
        "mystery.safetensors": ({"foo.weight": torch.zeros(2)}, "not a ControlNet or T2I-Adapter"),
    }
    for name, (state, _) in cases.items():
        save_file(state, str(tmp_path / name))
    return [(tmp_path / name, what) for name, (_, what) in cases.items()]


def test_files_of_other_kinds_are_named(tmp_path, unets):
    for path, what in files(tmp_path):
        with pytest.raises(CheckpointError, match=f"{path.name}: .*{what}"):
            load_control(path, unets[1])


def test_truncated_missing_malicious_and_foreign_folder(unets, tmp_path):
    net = tiny_controlnet(unets[0])
    good = write_original_controlnet(net, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_control(cut, unets[1])
    cut_pth = write_original_controlnet(net, tmp_path / "cut.pth")
    cut_pth.write_bytes(cut_pth.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_control(cut_pth, unets[1])
    with pytest.raises(CheckpointError, match="missing.safetensors does not exist"):
        load_control(tmp_path / "missing.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("PAYLOAD RAN",))

    evil = tmp_path / "evil.pth"
    torch.save({"control_model.zero_convs.0.0.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        load_control(evil, unets[1])
    unets[0].save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="a diffusers 'UNet2DConditionModel' folder"):
        load_control(tmp_path / "unet", unets[1])
    # a file cut down to fewer tensors (a mis-shaped or missing layer) lists what does not match
    state = torch.load(write_original_controlnet(net, tmp_path / "partial.pth"), weights_only=True)
    state.pop("control_model.zero_convs.1.0.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"(?s)partial.pth: the weights do not match.*zero_convs\.1\.0\.weight"):
        load_control(tmp_path / "partial.pth", unets[1])


def test_sdxl_controlnet_in_the_original_layout(tmp_path):
    """SDXL's ControlNet (label_emb, per-level transformer depths, linear projections) round-trips through the
    original layout, its config inferred with the base U-Net's micro-conditioning width."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    config = tiny_sdxl_unet_config(released=True)
    base = UNet(UNetConfig.from_dict(config))
    net = ControlNetModel.from_unet(UNet2DConditionModel(**config), conditioning_embedding_out_channels=(16, 32))
    path = write_original_controlnet(net, tmp_path / "controlnet_xl.safetensors")
    model = load_control(path, base)
    assert same(model, net)
    assert model.config.unet.addition_embed_type == "text_time"
    assert list(model.config.unet.transformer_layers_per_block) == list(net.config.transformer_layers_per_block)
