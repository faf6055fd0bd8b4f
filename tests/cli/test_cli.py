"""The `ldm` command: smoke tests on a tiny model, and bad input -> exit status 2 with one line on stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse exits for --help and usage errors
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(capsys, *argv, match: str):
    status, _, err = run(capsys, *argv)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and match in lines[0], lines[0]
    return lines[0]


def test_help_fits_a_screen_and_lists_commands(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for name in ("generate", "batch", "train", "convert", "info", "visualize"):
        assert name in out
    for command in ("generate", "info", "convert", "visualize"):
        status, out, _ = run(capsys, command, "--help")
        assert status == 0 and "--model" in out and len(out.splitlines()) <= 40, (command, out)


def test_module_entry_point_reports_usage_errors_without_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ldm", "generate", "x", "--steps", "zero"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("ldm generate: error: argument --steps: 'zero' is not an integer "
                                   "(see ldm generate --help)")


@pytest.mark.parametrize("argv, match", [
    (["generate", "x", "--height", "500"], "--height: 500 is not a multiple of 8"),
    (["generate", "x", "--width", "-8"], "--width: -8 must be at least 1"),
    (["generate", "x", "--seed", "abc"], "seed 'abc' is not an integer"),
    (["generate", "x", "--guidance", "nan"], "'nan' is not a finite number"),
    (["generate", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "give a PROMPT (or --from-png FILE)"),
    (["generate", "x", "-o", "out.jpg"], "must end in .png"),
    (["generate", "x", "--strength", "1.5"], "--strength must be in [0, 1]"),
    (["generate", "x", "--mask", "m.png"], "--mask needs --image"),
    (["generate", "x", "--device", "tpu"], "device 'tpu'"),
    (["generate", "x", "--device", "cuda:0"], "CUDA is not available"),
    (["generate", "x", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["generate", "--from-png", "missing.png"], "missing.png: no such file"),
    (["generate", "x", "--image", "missing.png"], "image 'missing.png' does not exist"),
    (["generate", "x", "--model", "no/such/model"], "model 'no/such/model' does not exist"),
    (["info", "no/such/file"], "'no/such/file' does not exist"),
    (["convert", "a", "b", "c"], "convert takes SRC DST"),
    (["convert", "no/such/src", "dst"], "source 'no/such/src' does not exist"),
    (["visualize", "x", "--t", "1,a"], "--t must be comma-separated integers"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "choose a command"),
])
def test_bad_input_is_one_line(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, *argv, match=match)


def test_unknown_sampler_lists_known_ones(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, "generate", "x", "--sampler", "warp_drive", match="warp_drive")
    assert "dpmpp_2m" in line and "ddim" in line
    assert line.startswith("ldm generate: error: unknown sampler 'warp_drive'"), line  # no KeyError text leaks in


def test_not_an_image_is_reported(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fake.png").write_text("hello")
    one_line_error(capsys, "generate", "x", "--image", "fake.png", match="'fake.png' is not a readable image")
    one_line_error(capsys, "info", "fake.png", match="fake.png: not a readable image")


def test_mask_of_another_size_is_rejected_before_loading(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save("in.png")
    Image.new("L", (32, 64)).save("mask.png")
    one_line_error(capsys, "generate", "x", "--image", "in.png", "--mask", "mask.png",
                   match="mask is 32x64 but the image is 64x64")


def test_missing_default_model_says_how_to_pass_one(capsys, tmp_path, monkeypatch):
    import ldm.assets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ldm.assets, "DEFAULT_MODEL", tmp_path / "absent")
    status, _, err = run(capsys, "generate", "a turtle")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "default model is not installed" in err and "--model PATH" in err


# ---------------------------------------------------------------------- smoke tests on a tiny model
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("cli") / "model", "sd1"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_pngs_with_metadata_and_from_png_redoes_them(capsys, tmp_path, model, single_thread):
    status, out, err = run(capsys, "generate", "a turtle, playing: basketball", "-o", str(tmp_path / "t.png"),
                           "--model", model, "--seed", "11", "--steps", "3", "--height", "16", "--width", "24",
                           "--negative", "blurry", "--sampler", "euler_a", "--guidance", "5", "--num", "2", "-q")
    assert status == 0, err
    assert out.split() == [str(tmp_path / "t-0.png"), str(tmp_path / "t-1.png")]
    with Image.open(tmp_path / "t-1.png") as im:
        assert im.size == (24, 16)
        settings = json.loads(im.info["ldm"])
        assert "Negative prompt: blurry" in im.info["parameters"]
    assert (settings["prompt"], settings["seed"], settings["sampler"], settings["guidance"]) == \
        ("a turtle, playing: basketball", 12, "euler_a", 5.0)
    assert settings["model_hash"] and len(settings["model_hash"]) == 10

    assert settings["model"] == "model" and str(tmp_path) not in im.info["parameters"] + im.info["ldm"]
    # the PNG names its model but holds no path: it is found again with --model
    line = one_line_error(capsys, "generate", "--from-png", str(tmp_path / "t-1.png"), "-o", str(tmp_path / "x.png"),
                          match="was made with model 'model' (hash ")
    assert "pass --model PATH" in line
    status, out, err = run(capsys, "generate", "--from-png", str(tmp_path / "t-1.png"), "-o",
                           str(tmp_path / "again.png"), "--model", model, "-q")
    assert status == 0, err
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "t-1.png"))  # bitwise the same
    status, _, err = run(capsys, "generate", "--from-png", str(tmp_path / "t-1.png"), "--steps", "4", "-o",
                         str(tmp_path / "changed.png"), "--model", model, "-q")
    assert status == 0, err  # a flag given on the command line wins over the stored setting
    assert json.loads(Image.open(tmp_path / "changed.png").info["ldm"])["steps"] == 4


def test_generate_default_name_img2img_and_inpaint(capsys, tmp_path, monkeypatch, model, single_thread):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "generate", "A turtle!", "--model", model, "--seed", "5", "--steps", "2", "-q")
    assert status == 0, err
    assert out.strip() == "a-turtle-5.png" and Path("a-turtle-5.png").is_file()
    Image.new("L", (16, 16), 255).save("mask.png")
    for extra in (["--strength", "0.5"], ["--mask", "mask.png"]):
        status, out, err = run(capsys, "generate", "a red apple", "--image", "a-turtle-5.png", *extra, "-o",
                               "edit.png", "--model", model, "--steps", "2", "-q")
        assert status == 0, err
        assert json.loads(Image.open("edit.png").info["ldm"])["extra"]["mode"] in ("img2img", "inpaint")
    line = one_line_error(capsys, "generate", "--from-png", "edit.png", "--model", model,
                          match="was made by inpaint; pass --image")
    assert "edit.png" in line


def test_info_convert_and_visualize(capsys, tmp_path, model, single_thread):
    status, out, err = run(capsys, "info", model, "--hash")
    assert status == 0, err
    assert "SD 1.x" in out and "epsilon" in out and "hash" in out
    status, out, err = run(capsys, "convert", model, str(tmp_path / "single.safetensors"))
    assert status == 0, err
    status, out, err = run(capsys, "convert", "--model", str(tmp_path / "single.safetensors"),
                           str(tmp_path / "folder"))
    assert status == 0 and (tmp_path / "folder" / "model_index.json").is_file(), err
    one_line_error(capsys, "convert", model, str(tmp_path / "folder"), match="exists; pass --overwrite")
    images = []
    for source in (model, str(tmp_path / "single.safetensors"), str(tmp_path / "folder")):
        path = tmp_path / f"img{len(images)}.png"
        status, _, err = run(capsys, "generate", "x", "-o", str(path), "--model", source, "--seed", "1",
                             "--steps", "2", "-q")
        assert status == 0, err
        images.append(pixels(path))
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])

    status, out, err = run(capsys, "info", str(tmp_path / "img0.png"))
    assert status == 0 and out.startswith("x\nSteps: 2, Sampler: DPM++ 2M")
    status, out, err = run(capsys, "visualize", "a turtle", "-o", str(tmp_path / "fig.png"), "--model", model,
                           "--t", "0,500,999", "--steps", "6", "--image", str(tmp_path / "img0.png"))
    assert status == 0, err
    with Image.open(tmp_path / "fig.png") as fig:
        assert fig.size == (80 + 3 * 128, 18 + 2 * 128)
