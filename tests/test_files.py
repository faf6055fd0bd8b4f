"""ldm.files: finished files get the mode an ordinary open() gives (0666 less the umask), whichever writer made
them: PNGs (`ldm generate`, `ldm batch`), model weights and configs, manifests."""

import os
import stat

import pytest
import torch
from PIL import Image

from ldm.checkpoints.tensor_io import write_json, write_safetensors
from ldm.cli import main
from ldm.files import TMP_SUFFIX, atomic_path, write_atomic
from ldm.pipeline.png_info import save_png


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_gives_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask           # 0644 under umask 022, 0640 under 027
    write_atomic(tmp_path / "a.bin", b"data")
    save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    write_safetensors(tmp_path / "c.safetensors", {"w": torch.zeros(2)})
    write_json(tmp_path / "sub" / "d.json", {"k": 1})
    for name in ("a.bin", "b.png", "c.safetensors", "sub/d.json"):
        assert mode(tmp_path / name) == expected, name
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and not list(tmp_path.glob(f".*{TMP_SUFFIX}"))


def test_generate_and_batch_write_0644_pngs(tmp_path, sd1_folder, capsys):
    old = os.umask(0o022)
    try:
        assert main(["generate", "a cat", "-o", str(tmp_path / "g.png"), "--model", str(sd1_folder),
                     "--steps", "1", "--height", "16", "--width", "16", "-q"]) == 0
        (tmp_path / "p.txt").write_text("a dog --h 16 --w 16\n")
        assert main(["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--model", str(sd1_folder),
                     "--steps", "1", "-q"]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "g.png", *(tmp_path / "out").iterdir()]
    assert len(files) >= 4   # g.png, the batch's PNG, manifest.jsonl, batch.json
    assert {f.name: mode(f) for f in files} == {f.name: 0o644 for f in files}
