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

REPO = Path(__file__).resolve().parents[1]


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
    import ldm.pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ldm.pipeline, "DEFAULT_MODEL", tmp_path / "absent")
    status, _, err = run(capsys, "generate", "a turtle")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "default model is not installed" in err and "--model PATH" in err
