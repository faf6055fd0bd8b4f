"""ldm.pages: a mapped file's pages handed back to the kernel come back unchanged when read again."""

import mmap
import sys
import threading

import numpy as np
import pytest

from ldm import pages
from proc_maps import resident_kb_of_mapping

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")


def _mapped(tmp_path, mb=16):
    path = tmp_path / "weights.bin"
    values = np.random.default_rng(0).standard_normal(mb * 2**20 // 4).astype(np.float32)
    values.tofile(path)
    f = open(path, "rb")
    view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    return path, values, f, view


def test_release_hands_back_a_read_only_mapping_and_the_values_come_back(tmp_path):
    path, values, f, view = _mapped(tmp_path)
    with f, view:
        mapped = np.frombuffer(view, dtype=np.float32)
        assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-4)   # every page read
        assert resident_kb_of_mapping(path) > 15_000
        assert pages.release(path) >= 16 * 2**20
        assert resident_kb_of_mapping(path) < 1_000
        assert np.array_equal(mapped, values)           # read again: from the file, unchanged
        del mapped


def test_a_page_changed_in_a_private_mapping_keeps_its_value(tmp_path):
    path, values, f, view = _mapped(tmp_path, mb=4)
    view.close()
    with f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as view:
        view[:4] = b"\0\0\0\0"                          # copy-on-write: exists only in this mapping's page
        assert pages.release(path) >= 4 * 2**20
        assert view[:4] == b"\0\0\0\0"
        assert view[4:8] == values[1:2].tobytes()
    assert open(path, "rb").read(4) == values[:1].tobytes()   # the file itself never changed


def test_mapped_files_finds_the_checkpoint_behind_safetensors_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(path))
    loaded = load_file(str(path))
    assert pages.mapped_files(loaded.values()) == {path.resolve()}
    assert pages.mapped_files([torch.randn(4)]) == set()


def test_released_while_keeps_a_reading_loop_under_the_file_size(tmp_path):
    """The compile's situation: a reader touching every page while the pages are handed back beside it."""
    path, values, f, view = _mapped(tmp_path, mb=32)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], resident_kb_of_mapping(path))

    watcher = threading.Thread(target=watch)
    with f, view:
        mapped = np.frombuffer(view, dtype=np.float32)
        watcher.start()
        with pages.released_while(path, interval_s=0.01):
            total = 0.0
            for chunk in np.array_split(mapped, 64):
                total += float(chunk.sum())
                threading.Event().wait(0.002)
        stop.set()
        watcher.join()
        assert total == pytest.approx(float(values.sum()), rel=1e-4)
        assert resident_kb_of_mapping(path) < 1_000
        assert peak[0] < 24_000                          # never all 32 MB at once
        del mapped, chunk
