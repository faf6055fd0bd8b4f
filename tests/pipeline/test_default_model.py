"""The shipped default model (ldm/assets/default, docs/default-model.md): what a user gets from `Pipeline()` and a
bare `ldm generate` on a fresh machine, with no download."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ldm.assets
from ldm import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
FOLDER = ldm.assets.DEFAULT_MODEL
LICENSES = FOLDER.parent / "licenses"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline()


def test_ships_inside_the_package_within_budget_with_its_licences():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40e6
    assert {f.parent.name for f in files if f.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    assert not (FOLDER / "tokenizer").exists()              # the bundled CLIP BPE tokenizer reads its prompts
    for notice in ("NOTICE-noto-emoji.txt", "NOTICE-twemoji.txt"):
        text = (LICENSES / notice).read_text()
        assert "Apache" in text or "CC-BY 4.0" in text


def test_bare_pipeline_uses_the_models_own_settings(pipe):
    settings = json.loads((FOLDER / "ldm.json").read_text())
    req = pipe.request("a turtle playing basketball")
    assert (req.steps, req.guidance, req.height, req.width) == (settings["steps"], settings["guidance"], 64, 64)
    assert pipe.source == FOLDER


def test_prompts_steer_the_colours(pipe):
    # Colour is the first thing the model learnt (docs/default-model-runs.md): an apple comes out red, a whale
    # blue, over two seeds each.
    red, blue = (np.stack(pipe([prompt] * 2, seed=[0, 1], progress=False, output_type="np"))
                 for prompt in ("a red apple", "a whale"))
    assert red[..., 0].mean() > red[..., 2].mean() + 0.05
    assert blue[..., 2].mean() > blue[..., 0].mean() + 0.05


def test_readme_command_writes_the_turtle(tmp_path):
    out = tmp_path / "turtle.png"
    subprocess.run([sys.executable, "-m", "ldm", "generate", "a turtle playing basketball", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    image = Image.open(out)
    assert image.size == (64, 64) and np.asarray(image).std() > 10   # a picture, not a flat field
