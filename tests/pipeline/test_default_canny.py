"""The canny ControlNet shipped beside the default model (ldm/assets/default-canny, docs/control.md): within its
budget, loaded by name on a fresh machine by the Python API and `ldm generate --control default-canny:...`, and the
drawing follows its edges (scripts/eval_default_canny.py measures it on more images)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ldm.assets
from ldm import Control, Pipeline
from ldm.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from eval_default_canny import agreement, drawn_outline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FOLDER = ldm.assets.DEFAULT_CANNY


@pytest.fixture(scope="module")
def pipe():
    return Pipeline()


def test_ships_in_fp16_within_budget_as_a_diffusers_folder():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 12e6
    assert {f.name for f in files} == {"config.json", "diffusion_pytorch_model.safetensors"}
    weights = load_file(str(FOLDER / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}


@pytest.mark.parametrize(("prompt", "shape"), [("a gift", "square"), ("a diamond", "diamond")])
def test_default_canny_makes_the_drawing_follow_the_edges(pipe, prompt, shape):
    unit = pipe.load_control("default-canny")
    assert unit.kind == "ControlNet" and unit.name == "default-canny"
    edges = drawn_outline(shape)
    steered = pipe(prompt, control=Control(unit, edges), seed=1, progress=False)[0]
    plain = pipe(prompt, seed=1, progress=False)[0]
    assert agreement(steered, edges)["f1"] > agreement(plain, edges)["f1"] + 0.2


def test_generate_command_takes_default_canny(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)      # nothing called default-canny here: the shipped one is found by name
    drawn_outline("circle").save(tmp_path / "edges.png")
    out = tmp_path / "turtle.png"
    status = main(["generate", "a turtle", "--control", "default-canny:edges.png", "--seed", "2", "-o", str(out),
                   "-q"])
    assert status == 0, capsys.readouterr().err
    pipe = Pipeline()
    expected = pipe("a turtle", control=Control(pipe.load_control("default-canny"), tmp_path / "edges.png"), seed=2,
                    progress=False)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
