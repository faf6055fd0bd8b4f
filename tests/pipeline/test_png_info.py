"""PNG generation metadata: A1111 infotext + ldm JSON, written and read back."""

import hashlib
import json

import pytest
from PIL import Image, PngImagePlugin

from ldm.pipeline.png_info import (GenerationInfo, info_from_parameters, parse_parameters, read_png_info, save_png,
                                   weights_hash)


def _info(**kw):
    base = dict(prompt="a turtle playing basketball", negative_prompt="blurry, low quality", seed=42, steps=30,
                sampler="dpmpp_2m", guidance=7.5, width=512, height=768, spacing="karras", clip_skip=2,
                model="/models/sd15.safetensors", model_hash="0123456789", dtype="float32")
    base.update(kw)
    return GenerationInfo(**base)


def test_infotext_is_a1111_format():
    text = _info().to_parameters()
    lines = text.split("\n")
    assert lines[0] == "a turtle playing basketball"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2] == ("Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
                        "Size: 512x768, Model hash: 0123456789, Model: sd15.safetensors, Clip skip: 2")


def test_infotext_round_trip_keeps_every_field():
    info = _info(prompt="line one\nline two: with a colon, and a comma", eta=0.3, guidance_rescale=0.7)
    back = info_from_parameters(info.to_parameters())
    for key in ("prompt", "negative_prompt", "seed", "steps", "sampler", "guidance", "width", "height",
                "spacing", "clip_skip", "eta", "guidance_rescale", "model_hash"):
        assert getattr(back, key) == getattr(info, key), key


def test_parses_foreign_infotext_with_quotes_and_old_sampler_names():
    text = ('masterpiece, 1girl\nNegative prompt: bad hands\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, '
            'Seed: 123, Size: 512x512, Model hash: abc, Lora hashes: "a: 1, b: 2", Version: v1.6.0')
    info = info_from_parameters(text)
    assert (info.sampler, info.spacing, info.guidance, info.seed) == ("dpmpp_2m", "karras", 7.0, 123)
    assert info.extra["Lora hashes"] == "a: 1, b: 2" and info.extra["Version"] == "v1.6.0"
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_png_round_trip_through_json_chunk(tmp_path):
    info = _info(prompt="🐢 a turtle, 「バスケ」", extra={"mode": "img2img", "strength": 0.6})
    path = save_png(Image.new("RGB", (16, 8), "red"), tmp_path / "a.png", info)
    assert read_png_info(path) == info
    with Image.open(path) as im:
        assert im.size == (16, 8)
        assert im.info["parameters"].startswith("🐢 a turtle")
        assert json.loads(im.info["ldm"])["seed"] == 42
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # the temporary file was renamed away


def test_png_with_only_a1111_chunk_is_read(tmp_path):
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", _info().to_parameters())
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", pnginfo=chunks)
    back = read_png_info(tmp_path / "b.png")
    assert (back.prompt, back.seed, back.sampler, back.spacing) == ("a turtle playing basketball", 42,
                                                                   "dpmpp_2m", "karras")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_png_info(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        read_png_info(tmp_path / "text.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="plain.png: no generation metadata"):
        read_png_info(tmp_path / "plain.png")
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("ldm", json.dumps({"prompt": "x"}))
    Image.new("RGB", (8, 8)).save(tmp_path / "partial.png", pnginfo=chunks)
    with pytest.raises(ValueError, match="lacks seed, steps"):
        read_png_info(tmp_path / "partial.png")


def test_weights_hash(tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"weights" * 1000)
    assert weights_hash(single) == hashlib.sha256(single.read_bytes()).hexdigest()[:10]  # A1111's "Model hash"
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"a")
    (folder / "model_index.json").write_text("{}")
    before = weights_hash(folder)
    (folder / "model_index.json").write_text('{"changed": true}')  # configs do not count
    assert weights_hash(folder) == before
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"b")
    assert weights_hash(folder) != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no weight files"):
        weights_hash(tmp_path / "empty")
