"""SDXL single files on tiny random models: the released layout (sgm's conditioner) read and written, checked
against diffusers' own conversion (its script's tables, re-expressed in tests/sdxl_reference.py) and loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm import Pipeline
from ldm.checkpoints import CheckpointError, describe, load, save_diffusers, save_single_file, sd_state_dict
from ldm.checkpoints.infer import Hints, analyse
from ldm.models.text import TextEncoder, TextEncoderConfig
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, VAEConfig
from sdxl_reference import BIG_G, CLIP_L, SDXL_BASE_UNET, SDXL_REFINER_UNET, SDXL_VAE, convert_folder
from tiny_sdxl import save_tiny_sdxl

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a turtle playing basketball", "a red apple"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"sdxl": save_tiny_sdxl(root / "base", seed=1, released=True),
            "sdxl_refiner": save_tiny_sdxl(root / "refiner", refiner=True, seed=2)}


@pytest.fixture(scope="module")
def script_file(folders, tmp_path_factory):
    """The base folder as diffusers' conversion script writes it (CLIP-L without text_model., Linear projection)."""
    path = tmp_path_factory.mktemp("script") / "sdxl.safetensors"
    save_file(convert_folder(folders["sdxl"]), str(path))
    return path


def weights_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def same_networks(a, b, cast=None) -> None:
    cast = cast or (lambda t: t)
    for name in ("unet", "vae"):
        assert weights_equal(getattr(a, name).state_dict(), {k: cast(v) for k, v in
                                                              getattr(b, name).state_dict().items()}), name
    assert len(a.text_encoders) == len(b.text_encoders)
    for x, y in zip(a.text_encoders, b.text_encoders):
        assert weights_equal(x.weights(), {k: cast(v) for k, v in y.weights().items()})
        assert x.config == y.config


def sdxl_diffusers(folder, refiner=False):
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    return cls.from_pretrained(folder)


# -- inference from shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_shapes_of_the_released_architectures_give_back_their_configs(family):
    refiner = family == "sdxl_refiner"
    sdxl_text = dict(skip_layers=1, final_norm=False)
    clip = TextEncoderConfig(**CLIP_L, family="sd1", **sdxl_text)
    big_g = TextEncoderConfig(**BIG_G, family="sd2", with_projection=True, **sdxl_text)
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(SDXL_REFINER_UNET if refiner else SDXL_BASE_UNET))
        vae = AutoencoderKL(VAEConfig.from_dict(SDXL_VAE))
        texts = [TextEncoder(big_g)] if refiner else [TextEncoder(clip), TextEncoder(big_g)]
    tensors, _ = sd_state_dict(unet, vae, *texts)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    assert shapes[prefix + "text_projection"] == (1280, 1280)
    assert shapes[prefix + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == ((1536, 2560) if refiner else (1280, 2816))
    layout = analyse("sd_xl.safetensors", shapes, {}, Hints())
    assert layout.family == family
    assert UNetConfig.from_dict(layout.unet) == unet.config
    assert VAEConfig.from_dict(layout.vae) == vae.config           # incl. SDXL's scaling factor 0.13025
    assert [slot.config for slot in layout.texts] == [t.config for t in texts]
    assert layout.pipeline["force_zeros_for_empty_prompt"] is not refiner


# -- loading the released layout -----------------------------------------------------------------------------
def released(tensors: dict) -> dict:
    """What the released sd_xl_base_1.0 file holds where the script differs: CLIP-L under text_model., the
    bigG projection as OpenCLIP's bare (width, embed) matrix, and the unused position_ids / logit_scale."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("conditioner.embedders.0.transformer."):
            key = key.replace(".transformer.", ".transformer.text_model.", 1)
        out[key] = value
    g = "conditioner.embedders.1.model."
    out[g + "text_projection"] = out.pop(g + "text_projection.weight").t().contiguous()
    out[g + "logit_scale"] = torch.tensor(4.6052)
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


@pytest.mark.parametrize("variant", ["script", "released", "fp16"])
def test_single_file_loads_to_the_folder_weights(folders, script_file, variant, tmp_path):
    path = script_file
    if variant != "script":
        tensors = released(load_file(str(script_file)))
        if variant == "fp16":
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        path = tmp_path / f"{variant}.safetensors"
        save_file(tensors, str(path))
    ours, folder = load(path), load(folders["sdxl"])
    fp16 = (lambda t: t.half().float()) if variant == "fp16" else None
    same_networks(ours, folder, fp16)
    assert ours.pipeline_config == {"force_zeros_for_empty_prompt": True}
    info = describe(path)
    assert (info.family, info.context_dim, info.dtype) == ("sdxl", 192, "float16" if variant == "fp16" else "float32")
    assert info.parameters["text_encoder_2"] == sum(t.numel() for t in folder.text_encoder_2.weights().values())
    assert "text encoder 2" in str(info) and "SDXL base" in str(info)


def test_script_file_draws_the_image_diffusers_draws(folders, script_file):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = sdxl_diffusers(folders["sdxl"])
    import diffusers
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, num_inference_steps=6, guidance_scale=5.0, latents=latents, height=64, width=64,
                    output_type="np").images
    ours = Pipeline.from_pretrained(script_file)(PROMPTS, steps=6, guidance=5.0, sampler="ddim", latents=latents,
                                                 height=64, width=64, output_type="np", progress=False)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(expected[0] - expected[1]).max() > 0.05


def test_ckpt_loads_with_the_weights_only_unpickler(folders, script_file, tmp_path):
    path = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": released(load_file(str(script_file))), "global_step": 3}, path)
    same_networks(load(path), load(folders["sdxl"]))
    assert describe(path).family == "sdxl"


def test_unet_only_file_names_the_missing_text_encoders(script_file, tmp_path):
    path = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(script_file)).items() if k.startswith("model.diffusion_model.")},
              str(path))
    with pytest.raises(CheckpointError, match="unet_only.safetensors: the file holds a U-Net") as err:
        load(path)
    assert "conditioner.embedders.0.transformer.text_model.* (CLIP ViT-L)" in str(err.value)
    assert "conditioner.embedders.1.model.* (OpenCLIP ViT-bigG)" in str(err.value)
    no_clip = tmp_path / "no_clip.safetensors"
    save_file({k: v for k, v in load_file(str(script_file)).items() if ".embedders.0." not in k}, str(no_clip))
    with pytest.raises(CheckpointError, match="without its CLIP ViT-L text encoder"):
        describe(no_clip)


# -- saving ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_folder_to_single_file_to_folder_round_trip(folders, family, tmp_path):
    import diffusers

    refiner = family == "sdxl_refiner"
    first = load(folders[family])
    save_single_file(first, tmp_path / "xl.safetensors")
    bare = tmp_path / "bare.safetensors"                       # no ldm metadata: every config from the shapes
    save_file(load_file(str(tmp_path / "xl.safetensors")), str(bare))
    again = load(bare)
    same_networks(again, first)
    assert again.pipeline_config == first.pipeline_config and again.info.family == family
    save_diffusers(again, tmp_path / "out")
    original = sdxl_diffusers(folders[family], refiner)
    ours = sdxl_diffusers(tmp_path / "out", refiner)
    assert ours.config.force_zeros_for_empty_prompt == original.config.force_zeros_for_empty_prompt
    if refiner:
        assert ours.config.requires_aesthetics_score and ours.text_encoder is None
    cls = type(original)
    # diffusers' own single-file loader (its tables, sgm -> diffusers) reads our file to the same weights.
    from_file = cls.from_single_file(str(bare), config=str(folders[family]), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, name) is None:
            continue
        want = getattr(original, name).state_dict()
        assert weights_equal(getattr(ours, name).state_dict(), want), name
        got = {k: v for k, v in getattr(from_file, name).state_dict().items() if not k.endswith("position_ids")}
        assert weights_equal(got, {k: v for k, v in want.items() if not k.endswith("position_ids")}), name
    with torch.no_grad():
        theirs = original.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        mine = ours.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(mine[0], theirs[0])
    torch.testing.assert_close(mine[2], theirs[2])
    assert isinstance(diffusers.DDIMScheduler.from_pretrained(tmp_path / "out", subfolder="scheduler"),
                      diffusers.DDIMScheduler)


def test_single_file_keys_follow_the_released_layout(folders, script_file, tmp_path):
    save_single_file(load(folders["sdxl"]), tmp_path / "xl.safetensors")
    ours = load_file(str(tmp_path / "xl.safetensors"))
    reference = released(load_file(str(script_file)))
    reference.pop("conditioner.embedders.1.model.logit_scale")
    reference.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    assert weights_equal(ours, reference)


def test_ldm_info_shows_both_text_encoders(folders, tmp_path, capsys):
    from ldm.cli import main

    save_single_file(load(folders["sdxl_refiner"]), tmp_path / "refiner.safetensors")
    assert main(["info", str(folders["sdxl"])]) == 0
    out = capsys.readouterr().out
    assert "SDXL base" in out and "text encoder 2" in out
    assert main(["info", str(tmp_path / "refiner.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "SDXL refiner" in out and "text encoder 2" not in out
