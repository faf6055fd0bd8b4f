"""Control units on the command line: ``ldm generate --control ...:module=canny`` with ``--control-dir``,
``--from-png`` redrawing the units a PNG records, and ``ldm batch`` lines with units (resumable); each image
equals the Python API's for the same settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from control_fixtures import tiny_controlnet, write_original_controlnet
from ldm import Control, Pipeline
from ldm.cli import main

FLAGS = ["--steps", "3", "--guidance", "5", "--sampler", "euler", "--height", "32", "--width", "32", "-q"]
KW = dict(steps=3, guidance=5.0, sampler="euler", height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def setup(sd1_folder, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("control-cli")
    (tmp / "cn").mkdir()
    write_original_controlnet(tiny_controlnet(UNet2DConditionModel.from_pretrained(sd1_folder / "unet"), seed=5),
                              tmp / "cn" / "tiny_canny.safetensors")
    a = np.full((40, 48, 3), 70, np.uint8)
    a[8:30, 6:28] = (240, 60, 60)
    Image.fromarray(a).save(tmp / "photo.png")
    pipe = Pipeline.from_pretrained(sd1_folder)
    return dict(tmp=tmp, model=sd1_folder, pipe=pipe, unit=pipe.load_control(tmp / "cn" / "tiny_canny.safetensors"))


def run(capsys, *argv):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_with_a_module_then_redraw_from_the_png(setup, capsys):
    tmp, pipe = setup["tmp"], setup["pipe"]
    out, again = tmp / "out.png", tmp / "again.png"
    spec = f"tiny_canny:{tmp / 'photo.png'}:0.9:0:0.8:module=canny:processor_res=128"
    status, err = run(capsys, "generate", "a box", "--model", setup["model"], "--control-dir", tmp / "cn",
                      "--control", spec, "--seed", "3", "-o", out, *FLAGS)
    assert status == 0, err
    control = Control(setup["unit"], tmp / "photo.png", 0.9, 0.0, 0.8, module="canny", processor_res=128)
    np.testing.assert_array_equal(pixels(out), np.asarray(pipe("a box", seed=3, control=control, **KW)[0]))
    assert "ControlNet 0: \"Module: canny, Model: tiny_canny, Weight: 0.9" in Image.open(out).info["parameters"]

    status, err = run(capsys, "generate", "--from-png", out, "--model", setup["model"], "-o", again, "-q")
    assert status == 2 and "records 1 control unit(s) [ControlNet 0: tiny_canny (canny)]" in err
    status, err = run(capsys, "generate", "--from-png", out, "--model", setup["model"], "-o", again, "-q",
                      "--control-image", tmp / "photo.png")
    assert status == 2 and "no control model 'tiny_canny'" in err
    status, err = run(capsys, "generate", "--from-png", out, "--model", setup["model"], "-o", again, "-q",
                      "--control-image", tmp / "photo.png", "--control-dir", tmp / "cn")
    assert status == 0, err
    np.testing.assert_array_equal(pixels(again), pixels(out))
    status, err = run(capsys, "generate", "x", "--control", "tiny_canny:photo.png:1:module=hed", *FLAGS)
    assert status == 2 and "unknown preprocessor 'hed'" in err


def test_batch_lines_take_control_units_and_resume(setup, capsys):
    tmp, pipe = setup["tmp"], setup["pipe"]
    model_file, photo = tmp / "cn" / "tiny_canny.safetensors", tmp / "photo.png"
    lines = tmp / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "a box", "seed": 3, "control": f"{model_file}:{photo}:0.9:module=canny"})
                     + "\n" + json.dumps({"prompt": "a cup", "seed": 4}) + "\n"
                     + json.dumps({"prompt": "a box", "seed": 5, "control": [{"model": str(model_file),
                                                                             "image": str(photo), "weight": 0.5}]})
                     + "\n")
    out = tmp / "batch"
    batch = ["batch", lines, "--out", out, "--model", setup["model"], *FLAGS[:-1], "--batch-size", "3", "-q"]
    status, err = run(capsys, *batch)
    assert status == 0, err
    records = {r["line"]: r["file"] for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    expected = {1: pipe("a box", seed=3, control=Control(setup["unit"], photo, 0.9, module="canny"), **KW)[0],
                2: pipe("a cup", seed=4, **KW)[0],
                3: pipe("a box", seed=5, control=Control(setup["unit"], photo, 0.5), **KW)[0]}
    for line, image in expected.items():
        np.testing.assert_array_equal(pixels(out / records[line]), np.asarray(image), err_msg=f"line {line}")
    status, err = run(capsys, *batch)
    assert status == 0 and "3 images: 0 made, 3 already done" in err

    bad = tmp / "bad.txt"
    bad.write_text(f"a box --control {tmp / 'missing.pth'}:{photo}\na cup --control x.pth:y.png:0.5:module=hed\n")
    status, err = run(capsys, "batch", bad, "--out", tmp / "bad-out", "--model", setup["model"], *FLAGS[:-1])
    assert status != 0 and "bad.txt:2: control[0]: unknown preprocessor 'hed'" in err
    bad.write_text(f"a box --control {tmp / 'missing.pth'}:{photo}\n")
    status, err = run(capsys, "batch", bad, "--out", tmp / "bad-out", "--model", setup["model"], *FLAGS[:-1])
    assert status != 0 and "bad.txt:1:" in err and "missing.pth" in err
