"""Checkpoint loading and saving on tiny random models: key tables, round trips, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoints import CheckpointError, describe, load, save_diffusers, save_single_file, sd_state_dict
from ldm.checkpoints.infer import Hints, analyse
from ldm.checkpoints.keys import UNET_PREFIX, ema_key, unet_keymaps, vae_keymaps
from ldm.models.text import TextEncoder, TextEncoderConfig
from ldm.assets import TOKENIZER_DIR
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, VAEConfig
from tiny_models import save_tiny_pipeline, tiny_unet_config, tiny_vae_config

PROMPTS = ["a red apple", "a turtle playing basketball"]
# The released models' architectures (diffusers configs of stable-diffusion-v1-5 and stable-diffusion-2-1).
CROSS3 = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
REAL = {
    "sd1": (dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 attention_head_dim=8, cross_attention_dim=768, **CROSS3), TextEncoderConfig.sd1(), None),
    "sd2": (dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True, **CROSS3), TextEncoderConfig.sd2(), "v_prediction"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_tiny_pipeline(root / family, family=family, seed=i) for i, family in
            enumerate(("sd1", "sd2"))}


@pytest.fixture(scope="module")
def loaded(folders):
    return {family: load(folder) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def single_files(loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    paths = {}
    for family, components in loaded.items():
        paths[family] = root / f"{family}.safetensors"
        save_single_file(components, paths[family])
    return paths


def weights_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def without_metadata(path, target):
    save_file(load_file(str(path)), str(target))
    return target


def edited(path, target, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(target))
    return target


# -- key tables ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_key_tables_agree_with_diffusers_single_file_conversion(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = UNet2DConditionModel(**tiny_unet_config(family))
    ours = unet.state_dict()
    levels = len(unet.config.block_out_channels)
    maps = unet_keymaps(ours, [unet.config.layers_per_block] * levels,
                        [t.startswith("CrossAttn") for t in unet.config.up_block_types])
    file = {m.theirs: ours[m.ours] for m in maps}
    assert len(file) == len(ours)                          # one file key per tensor, no collisions
    assert weights_equal(convert_ldm_unet_checkpoint(file, dict(unet.config)), ours)

    vae = AutoencoderKL(**tiny_vae_config())
    ours = vae.state_dict()
    file = {m.theirs: ours[m.ours][:, :, None, None] if m.conv else ours[m.ours]
            for m in vae_keymaps(ours, len(vae.config.block_out_channels))}
    assert weights_equal(convert_ldm_vae_checkpoint(file, dict(vae.config)), ours)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shapes_of_the_released_architectures_give_back_their_configs(family):
    unet_config, text_config, prediction = REAL[family]
    vae_config = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=unet_config[
        "sample_size"] * 8)
    with torch.device("meta"):              # shapes only: no memory, no initialisation
        unet = UNet(UNetConfig.from_dict(unet_config))
        vae = AutoencoderKL(VAEConfig.from_dict(vae_config))
        text = TextEncoder(text_config)
    tensors, _ = sd_state_dict(unet, vae, text)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if family == "sd2":
        assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    layout = analyse("model.safetensors", shapes, {}, Hints(prediction_type=prediction))
    assert UNetConfig.from_dict(layout.unet) == unet.config
    assert VAEConfig.from_dict(layout.vae) == vae.config
    assert layout.text == text_config and layout.family == family


def test_sd_key_names_follow_the_original_layout(single_files):
    keys = set(load_file(str(single_files["sd1"])))
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.bias",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys, key
    sd2 = load_file(str(single_files["sd2"]))
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert sd2["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


# -- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_to_single_file_to_diffusers_round_trip(family, folders, single_files, tmp_path):
    from diffusers import StableDiffusionPipeline

    reloaded = load(single_files[family])
    save_diffusers(reloaded, tmp_path / "out")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]      # temporary files renamed away
    tokenizer_files = tmp_path / "out" / "tokenizer"
    assert (tokenizer_files / "merges.txt").read_text() == (TOKENIZER_DIR / "merges.txt").read_text()
    assert json.loads((tokenizer_files / "vocab.json").read_text()) == \
        json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    original = StableDiffusionPipeline.from_pretrained(folders[family])
    # diffusers' own single-file loader (its SD -> diffusers tables) reads our SD file to the same weights.
    from_file = StableDiffusionPipeline.from_single_file(single_files[family], config=str(folders[family]),
                                                         local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        assert weights_equal(getattr(ours, name).state_dict(), getattr(original, name).state_dict()), name
        assert weights_equal(getattr(from_file, name).state_dict(), getattr(original, name).state_dict()), name
    assert ours.tokenizer.pad_token_id == original.tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_prompt(PROMPTS, "cpu", 1, False)[0],
                                   original.encode_prompt(PROMPTS, "cpu", 1, False)[0])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_reload_has_identical_weights_and_context(family, loaded, single_files):
    first, again = loaded[family], load(single_files[family])
    assert weights_equal(again.unet.state_dict(), first.unet.state_dict())
    assert weights_equal(again.vae.state_dict(), first.vae.state_dict())
    assert again.unet.config == first.unet.config and again.vae.config == first.vae.config
    if family == "sd2":     # the SD 2.x file holds an OpenCLIP tower; the folder a 23-of-24-style CLIPTextModel
        assert (again.text_encoder.config.backend, first.text_encoder.config.backend) == ("open_clip", "transformers")
    with torch.no_grad():
        torch.testing.assert_close(again.text_encoder(PROMPTS), first.text_encoder(PROMPTS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_file_without_ldm_metadata_infers_the_same_model(family, loaded, single_files, tmp_path):
    bare = without_metadata(single_files[family], tmp_path / "bare.safetensors")
    again, first = load(bare), loaded[family]
    ignore = {"sample_size"}                    # shapes cannot tell; SD's native size is used instead
    mine = {k: v for k, v in again.unet.config.to_dict().items() if k not in ignore}
    assert mine == {k: v for k, v in first.unet.config.to_dict().items() if k not in ignore}
    assert again.unet.config.sample_size == 64
    assert weights_equal(again.unet.state_dict(), first.unet.state_dict())
    assert weights_equal(again.vae.state_dict(), first.vae.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.text_encoder(PROMPTS), first.text_encoder(PROMPTS), atol=1e-5, rtol=1e-5)


def test_prediction_type_from_sidecar_yaml_or_argument(single_files, tmp_path):
    bare = without_metadata(single_files["sd2"], tmp_path / "v-model.safetensors")
    assert describe(bare).prediction_type == "epsilon"
    (tmp_path / "v-model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    scale_factor: 0.13\n"
                                           "    unet_config:\n      params:\n        num_head_channels: 64\n")
    info = describe(bare)
    assert (info.prediction_type, info.sample_size, info.resolution) == ("v_prediction", 96, 192)
    components = load(bare)
    assert components.schedule.prediction_type == "v_prediction"
    assert components.vae.config.scaling_factor == 0.13
    assert load(bare, prediction_type="epsilon").schedule.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type='v'"):
        load(bare, prediction_type="v")


@pytest.mark.parametrize("metadata", [{"modelspec.prediction_type": "v"}, {"ss_v_parameterization": "True"}])
def test_prediction_type_from_other_tools_metadata(single_files, tmp_path, metadata):
    path = tmp_path / "tagged.safetensors"
    save_file(load_file(str(single_files["sd2"])), str(path), metadata=metadata)
    info = describe(path)
    assert (info.prediction_type, info.sample_size) == ("v_prediction", 96)


def test_ckpt_with_lightning_nesting_loads_like_the_safetensors(loaded, single_files, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single_files["sd1"])), "global_step": 10, "epoch": 1}, path)
    components = load(path)
    assert weights_equal(components.unet.state_dict(), loaded["sd1"].unet.state_dict())
    assert describe(path).format == "ckpt"


def test_ema_weights_are_used_when_present(single_files, loaded, tmp_path):
    def add_ema(tensors):
        for key in [k for k in tensors if k.startswith(UNET_PREFIX)]:
            tensors[ema_key(key)] = tensors[key] + 1
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(100, dtype=torch.int32)

    path = edited(single_files["sd1"], tmp_path / "ema.safetensors", add_ema)
    assert "model_ema.diffusion_modelinput_blocks00weight" in load_file(str(path))
    assert describe(path).ema
    original = loaded["sd1"].unet.state_dict()
    ema = load(path).unet.state_dict()
    assert all(torch.equal(ema[k], original[k] + 1) for k in original)
    assert weights_equal(load(path, use_ema=False).unet.state_dict(), original)


def test_fp16_variant_and_bin_folders(tmp_path):
    from diffusers import StableDiffusionPipeline

    fp16 = save_tiny_pipeline(tmp_path / "fp16", family="sd1", seed=5, variant="fp16")
    assert (fp16 / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    components = load(fp16)
    assert components.info.dtype == "float16" and components.unet.conv_in.weight.dtype == torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(fp16, variant="fp16")
    assert weights_equal(components.unet.to(torch.float16).state_dict(), pipe.unet.state_dict())
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "vae" / "diffusion_pytorch_model.bin").is_file()
    assert weights_equal(load(tmp_path / "bin", dtype=torch.float16).vae.state_dict(), pipe.vae.state_dict())


def test_inpainting_model_is_recognised(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "inpaint", family="sd1", inpaint=True)
    components = load(folder)
    assert components.info.inpainting and components.unet.config.in_channels == 9
    save_single_file(components, tmp_path / "inpaint.safetensors")
    bare = without_metadata(tmp_path / "inpaint.safetensors", tmp_path / "bare.safetensors")
    info = describe(bare)
    assert info.inpainting and info.unet_in_channels == 9
    assert "inpainting" in str(info)


def test_defaults_travel_with_the_model(loaded, tmp_path):
    assert loaded["sd1"].defaults == {}
    defaults = {"steps": 12, "guidance": 3.0, "sampler": "euler", "height": 64, "width": 64}
    components = dataclasses.replace(loaded["sd1"], defaults=defaults)
    save_diffusers(components, tmp_path / "folder")
    assert json.loads((tmp_path / "folder" / "ldm.json").read_text()) == components.defaults
    assert load(tmp_path / "folder").defaults == components.defaults
    save_single_file(components, tmp_path / "file.safetensors")
    assert load(tmp_path / "file.safetensors").defaults == components.defaults


def test_dtype_and_describe(folders):
    components = load(folders["sd2"], dtype=torch.float16)
    assert {p.dtype for p in components.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.float16}
    info = describe(folders["sd2"])
    assert (info.family, info.format, info.context_dim, info.block_out_channels) == ("sd2", "diffusers", 64, (64, 128))
    assert info.parameters["unet"] == sum(p.numel() for p in components.unet.parameters())
    text = str(info)
    assert "SD 2.x" in text and "epsilon" in text and "MB" in text


# -- bad input ----------------------------------------------------------------------------------------------
def test_truncated_safetensors(single_files, tmp_path):
    data = single_files["sd1"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"noise\\{suffix}"):
        load(path)


class CreatesFile:
    """Unpickling this object would create a file (its __reduce__ calls open(path, "w"))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_would_run_code_is_refused_unrun(tmp_path, writer):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": CreatesFile(target)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt") as err:
        load(path)
    assert not target.exists()
    if writer == "torch.save":
        assert "refused" in str(err.value) and "open" in str(err.value)


def test_unknown_and_unsupported_families(tmp_path):
    for family, key in (("SD3", "model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"),
                        ("Flux", "double_blocks.0.img_attn.norm.key_norm.scale"),
                        ("Stable Cascade", "clip_txt_mapper.weight")):
        path = tmp_path / f"{family}.safetensors"
        save_file({key: torch.zeros(1)}, str(path))
        with pytest.raises(CheckpointError, match=f"{family}.safetensors: not supported, this is {family}"):
            load(path)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, str(sdxl))
    with pytest.raises(CheckpointError, match="xl.safetensors: SDXL file without its CLIP ViT-L text encoder"):
        load(sdxl)
    no_text = tmp_path / "no_text.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.mystery.weight": torch.zeros(1)}, str(no_text))
    with pytest.raises(CheckpointError, match="unknown model family.*cond_stage_model.mystery"):
        describe(no_text)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint.*encoder.weight"):
        load(other)


def test_missing_key_is_listed_with_its_shape(single_files, tmp_path):
    key = "first_stage_model.decoder.up.1.block.0.conv1.weight"
    path = edited(single_files["sd1"], tmp_path / "missing.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing.safetensors") as err:
        load(path)
    assert f"1 missing key(s):\n    {key} (expected shape [64, 64, 3, 3])" in str(err.value)


def test_misshaped_key_is_listed_with_expected_and_found(single_files, tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"

    def shrink(tensors):
        tensors[key] = tensors[key][:16]

    path = edited(single_files["sd1"], tmp_path / "bad.safetensors", shrink)
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert f"{key}: expected [32, 32, 3, 3], found [16, 32, 3, 3]" in str(err.value)


def test_unexpected_keys_are_listed_and_capped(single_files, tmp_path):
    def junk(tensors):
        for i in range(20):
            tensors[f"model.diffusion_model.extra.{i:02d}.weight"] = torch.zeros(1)

    path = edited(single_files["sd1"], tmp_path / "junk.safetensors", junk)
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert "20 unexpected key(s)" in message and "model.diffusion_model.extra.00.weight" in message
    assert "... and 8 more" in message


def test_bad_folders_and_paths(loaded, tmp_path):
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such file"):
        load(tmp_path / "nowhere.safetensors")
    broken = tmp_path / "broken"
    save_diffusers(loaded["sd1"], broken)
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="unet: no weights"):
        load(broken)


def test_failed_save_leaves_the_old_file_intact(loaded, single_files, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    path.write_bytes(single_files["sd1"].read_bytes())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(loaded["sd2"], path)
    assert path.read_bytes() == single_files["sd1"].read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
