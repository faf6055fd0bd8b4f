"""TAESD / TAESDXL (ldm.models.taesd): parity with diffusers' AutoencoderTiny on tiny random weights, and every
way its weights come (diffusers folder and single file, the original taesd_encoder/decoder halves as .pth or
.safetensors, a decoder alone, ComfyUI's one-file form), loaded by ldm.checkpoints.vae_files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoints import CheckpointError
from ldm.checkpoints.vae_files import infer_tiny, load_vae_file
from ldm.models.taesd import AutoencoderTiny, TinyVAEConfig, original_key
from tiny_models import perturb

pytestmark = pytest.mark.usefixtures("single_thread")
# one width a half, as diffusers builds it
TINY = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(12, 12, 12),
            num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(1, 2, 1))


def reference(seed=0, **overrides):
    from diffusers import AutoencoderTiny as Theirs

    torch.manual_seed(seed)
    return perturb(Theirs(**{**TINY, **overrides}), seed, scale=0.05).eval()


def ours_from(theirs) -> AutoencoderTiny:
    ours = AutoencoderTiny(TinyVAEConfig.from_dict(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def inputs(h=24, w=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1, torch.randn(2, 4, h // 4, w // 4, generator=g) * 2


def assert_same_model(loaded, theirs):
    x, z = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).mode(), theirs.encode(x).latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)


def original_halves(theirs) -> dict[str, dict[str, torch.Tensor]]:
    """The original release's two Sequential state dicts (what taesd.py's Encoder()/Decoder() hold)."""
    halves = {"encoder": {}, "decoder": {}}
    for key, value in theirs.state_dict().items():
        half, theirs_key = original_key(key)
        halves[half][theirs_key] = value.clone()
    return halves


def test_parameter_names_and_outputs_match_diffusers():
    theirs = reference()
    ours = ours_from(theirs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert ours.config.downscale == 4 and ours.config.scaling_factor == 1.0
    assert_same_model(ours, theirs)
    x, _ = inputs()
    with torch.no_grad():   # diffusers' forward stores the latents as 8-bit images in between
        u = ours.scale_latents(ours.encode(x).mode())
        torch.testing.assert_close(ours.unscale_latents(u), theirs.unscale_latents(theirs.scale_latents(
            theirs.encode(x).latents)), atol=1e-5, rtol=1e-5)


def test_default_config_is_taesd_and_shapes_give_it_back():
    from diffusers import AutoencoderTiny as Theirs

    with torch.device("meta"):
        theirs = Theirs()
    ours = AutoencoderTiny()
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(v.numel() for v in ours.decoder.parameters()) == pytest.approx(1.2e6, rel=0.05)
    inferred = TinyVAEConfig.from_dict(infer_tiny("taesd", shapes))
    assert inferred == TinyVAEConfig()


def test_diffusers_folder_and_single_file_load_strictly(tmp_path):
    theirs = reference(seed=2)
    theirs.save_pretrained(tmp_path / "taesd")
    loaded = load_vae_file(tmp_path / "taesd")
    assert loaded.kind == "tiny" and isinstance(loaded.vae, AutoencoderTiny)
    assert_same_model(loaded.vae, theirs)
    # the weights file alone: the config.json beside it, and without it the config inferred from shapes
    alone = tmp_path / "taesd" / "diffusion_pytorch_model.safetensors"
    assert_same_model(load_vae_file(alone).vae, theirs)
    other = tmp_path / "elsewhere.safetensors"
    other.write_bytes(alone.read_bytes())
    assert_same_model(load_vae_file(other).vae, theirs)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_halves_load_as_diffusers_conversion_script_makes_them(tmp_path, suffix):
    theirs = reference(seed=3)
    for half, state in original_halves(theirs).items():
        path = tmp_path / f"taesd_{half}{suffix}"
        torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    for named in (tmp_path / f"taesd_decoder{suffix}", tmp_path / f"taesd_encoder{suffix}", tmp_path):
        loaded = load_vae_file(named)
        assert loaded.files[0].name == f"taesd_decoder{suffix}" and len(loaded.files) == 2
        assert_same_model(loaded.vae, theirs)


def test_a_decoder_alone_decodes_and_says_it_cannot_encode(tmp_path):
    theirs = reference(seed=4)
    torch.save(original_halves(theirs)["decoder"], tmp_path / "taesdxl_decoder.pth")
    vae = load_vae_file(tmp_path / "taesdxl_decoder.pth").vae
    x, z = inputs()
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no encoder"):
        vae.encode(x)


def test_an_encoder_alone_is_refused_naming_the_decoder(tmp_path):
    torch.save(original_halves(reference())["encoder"], tmp_path / "taesd_encoder.pth")
    with pytest.raises(CheckpointError, match="taesd_decoder.pth"):
        load_vae_file(tmp_path / "taesd_encoder.pth")


def test_comfyui_one_file_form(tmp_path):
    theirs = reference(seed=5)
    halves = original_halves(theirs)
    state = {f"taesd_{half}.{k}": v for half, s in halves.items() for k, v in s.items()}
    state |= {"vae_scale": torch.tensor(1 / 0.18215), "vae_shift": torch.tensor(0.0)}
    save_file(state, str(tmp_path / "taesd.safetensors"))
    assert_same_model(load_vae_file(tmp_path / "taesd.safetensors").vae, theirs)


def test_folder_of_several_decoders_asks_which(tmp_path):
    halves = original_halves(reference())
    for name in ("taesd_decoder.pth", "taesdxl_decoder.pth"):
        torch.save(halves["decoder"], tmp_path / name)
    with pytest.raises(CheckpointError, match="several TAESD decoders"):
        load_vae_file(tmp_path)


def test_mismatched_halves_list_the_bad_keys(tmp_path):
    halves = original_halves(reference())
    torch.save(halves["decoder"], tmp_path / "taesd_decoder.pth")
    encoder = dict(halves["encoder"])
    encoder["0.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(encoder, tmp_path / "taesd_encoder.pth")
    named = r"taesd_decoder.pth \+ taesd_encoder.pth(.|\n)*mis-shaped(.|\n)*taesd_encoder.pth: 0\.weight"
    with pytest.raises(CheckpointError, match=named):
        load_vae_file(tmp_path / "taesd_decoder.pth")


def test_tiling_and_dtype():
    ours = ours_from(reference(seed=6))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        whole = ours.decode(ours.encode(x).mode())
        ours.set_tiling(True, 16)
        tiled = ours.decode(ours.encode(x).mode())
        assert tiled.shape == whole.shape and (tiled - whole).abs().mean() < 0.1
        half = ours.decode(torch.randn(1, 4, 4, 4), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ours.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tile_size"):
        ours.set_tiling(True, 6)


def test_config_round_trips_through_diffusers_keys():
    cfg = TinyVAEConfig(**TINY)
    assert TinyVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        TinyVAEConfig.from_dict({"warp": 1})
