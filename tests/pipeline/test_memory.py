"""A request too big for the machine is refused before anything is allocated, with one clear error."""

import pytest

from ldm import Pipeline
from ldm.cli import main
from ldm.pipeline import memory
from ldm.pipeline.memory import NotEnoughMemory, estimate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline()   # the shipped model: its U-Net is narrow, so at 512² the VAE decode is the peak


def test_a_huge_size_is_refused_with_the_size_the_estimate_and_the_way_out(pipe):
    with pytest.raises(NotEnoughMemory) as info:
        pipe.request("a cat", height=100000, width=100000, seed=0)
    message = str(info.value)
    assert "100000x100000" in message and "GiB of working memory" in message and "available" in message
    assert "smaller size" in message


def test_the_estimate_grows_with_the_image_and_tiling_bounds_the_vae(pipe):
    small, big = (estimate(pipe, pipe.request("a", height=s, width=s, seed=0)) for s in (128, 1024))
    assert big.unet > 40 * small.unet and big.vae > 40 * small.vae   # ~64× the pixels
    pipe.enable_vae_tiling(64)
    try:
        tiled = estimate(pipe, pipe.request("a", height=1024, width=1024, seed=0))
    finally:
        pipe.vae.set_tiling(False)
    assert tiled.vae * 30 < big.vae and tiled.unet == big.unet
    four = estimate(pipe, pipe.request(["a"] * 4, height=128, width=128, seed=0))
    assert four.images == 4 * small.images   # the batch-invariant U-Net runs up to micro_batch images a call:
    assert four.unet > small.unet            # here all four,
    pipe.micro_batch = 1
    try:                                     # and with one image a call, the U-Net part of one image
        assert estimate(pipe, pipe.request(["a"] * 4, height=128, width=128, seed=0)).unet == small.unet
    finally:
        pipe.micro_batch = 4


def test_refusal_follows_the_memory_available_and_names_tiling_when_it_helps(pipe, monkeypatch):
    size = dict(height=1024, width=1024, seed=0)
    need = estimate(pipe, pipe.request("a", **size))
    pipe.enable_vae_tiling(64)
    try:
        tiled = estimate(pipe, pipe.request("a", **size))
    finally:
        pipe.vae.set_tiling(False)
    assert tiled.total < need.total   # the decode is this model's peak at 1024²
    free = int(tiled.total / memory.MARGIN) + 2**20   # enough for the tiled decode only
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    with pytest.raises(NotEnoughMemory, match="1024x1024 \\(1 image\\)") as info:
        pipe.request("a", **size)
    assert "--vae-tiling" in str(info.value)
    pipe.enable_vae_tiling(64)
    try:
        assert pipe.request("a", **size).height == 1024  # tiling is the way out it named
    finally:
        pipe.vae.set_tiling(False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need.total * 2)
    assert pipe.request("a", **size).height == 1024


def test_cli_refuses_in_one_line_and_batch_names_the_line(capsys, tmp_path, sd1_folder):
    status = main(["generate", "cat", "-o", str(tmp_path / "x.png"), "--height", "100000", "--width", "100000"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "100000x100000" in err and "available" in err
    assert not (tmp_path / "x.png").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small cat --h 16 --w 16\na huge cat --h 100000 --w 100000\n")
    status = main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--model", str(sd1_folder), "-q"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and f"{prompts}:2:" in err and "100000x100000" in err
