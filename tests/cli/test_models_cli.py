"""Names on the command line: ``ldm models`` lists a models folder; ``--model``, ``--vae``, ``--control`` and
``<lora:NAME>`` take its names in ``ldm generate`` and ``ldm batch`` (and a Hugging Face repo id from the local
cache), drawing what the Python API draws from the same files."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ldm import Control, Pipeline
from ldm.checkpoints.library import Library
from ldm.cli import main
from library_fixtures import build_models_dir, fake_hf_cache

FLAGS = ["--steps", "2", "--guidance", "3", "--sampler", "euler", "--height", "32", "--width", "32"]
KW = dict(steps=2, guidance=3.0, sampler="euler", height=32, width=32, progress=False)
PROMPT = "a red apple <lora:style:0.7>"


@pytest.fixture(scope="module")
def models_dir(sd1_folder, tmp_path_factory):
    return build_models_dir(tmp_path_factory.mktemp("comfy"), "comfyui", sd1_folder)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm-cache"))
    monkeypatch.delenv("LDM_MODELS_DIR", raising=False)


def run(capsys, *argv):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_ldm_models_lists_every_kind_as_one_table(models_dir, capsys):
    cut = models_dir / "models" / "loras" / "cut.safetensors"
    cut.write_bytes((models_dir / "models" / "loras" / "style.safetensors").read_bytes()[:100])
    try:
        status, out, err = run(capsys, "models", "--models-dir", models_dir)
        assert status == 0, err
        table = out.split("\n\n")[0].splitlines()
        rows = {tuple(re.split(r"\s{2,}", line)[i] for i in (0, 1, 4)) for line in table[1:]}
        assert re.split(r"\s{2,}", table[0]) == ["KIND", "FAMILY", "SIZE", "HASH", "NAME"]
        assert {("checkpoint", "sd1", "sub/tiny"), ("checkpoint", "sd1", "tiny-diffusers"), ("lora", "-", "style"),
                ("lora", "broken", "cut"), ("vae", "-", "tiny-vae"), ("controlnet", "-", "tiny-control"),
                ("embedding", "-", "shiny")} == rows
        assert "truncated" in next(line for line in table if "broken" in line)
        assert "hashes not computed yet" in out
        status, out, _ = run(capsys, "models", "--models-dir", models_dir, "--kind", "checkpoint", "--hash")
        digest = Library(models_dir).find("checkpoint", "sub/tiny").hash()
        assert status == 0 and f" {digest} " in out and "lora" not in out
    finally:
        cut.unlink()
    status, _, err = run(capsys, "models")
    assert status == 2 and "give --models-dir DIR (or set LDM_MODELS_DIR)" in err


def test_generate_takes_library_names_for_every_kind(models_dir, tmp_path, capsys):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "hint.png")
    out = tmp_path / "out.png"
    status, _, err = run(capsys, "generate", PROMPT, "--models-dir", models_dir, "--model", "tiny", "--vae",
                         "tiny-vae", "--control", f"tiny-control:{tmp_path / 'hint.png'}:0.5", "--seed", "5", "-o",
                         out, "-q", *FLAGS)
    assert status == 0, err
    pipe = Pipeline.from_pretrained("sub/tiny", models_dir=models_dir).load_vae("tiny-vae")
    expected = pipe(PROMPT, seed=5, control=Control(pipe.load_control("tiny-control"), tmp_path / "hint.png", 0.5),
                    **KW)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    status, _, err = run(capsys, "generate", "x", "--models-dir", models_dir, "--model", "tin")
    assert status == 2 and "no checkpoint named 'tin'" in err and "did you mean 'sub/tiny'" in err


def test_batch_lines_take_library_names(models_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_MODELS_DIR", str(models_dir))            # the folder from the environment this time
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --s 5\n")
    status, _, err = run(capsys, "batch", prompts, "--out", tmp_path / "out", "--model", "tiny-diffusers", "-q",
                         *FLAGS)
    assert status == 0, err
    [png] = (tmp_path / "out").glob("*.png")
    expected = Pipeline.from_pretrained("tiny-diffusers")(PROMPT, seed=5, **KW)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(expected))


def test_a_repo_id_from_the_hugging_face_cache(sd1_folder, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))   # as HF_HUB_CACHE set at start-up
    fake_hf_cache(tmp_path / "hub", "org/tiny", sd1_folder)
    status, _, err = run(capsys, "generate", "a blue square", "--model", "org/tiny", "--seed", "2", "-o",
                         tmp_path / "a.png", "-q", *FLAGS)
    assert status == 0, err
    expected = Pipeline.from_pretrained(sd1_folder)("a blue square", seed=2, **KW)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(expected))
    status, _, err = run(capsys, "generate", "x", "--model", "org/missing")
    assert status == 2 and str(tmp_path / "hub" / "models--org--missing") in err and len(err.splitlines()) == 1


def test_from_png_finds_the_model_in_the_library_by_its_hash(models_dir, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert run(capsys, "generate", "a blue square", "--models-dir", models_dir, "--model", "tiny-diffusers",
               "--seed", "3", "-o", first, "-q", *FLAGS)[0] == 0
    status, _, err = run(capsys, "generate", "--from-png", first, "--models-dir", models_dir, "-o", again, "-q")
    assert status == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
