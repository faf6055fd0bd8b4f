"""The OpenVINO backend (ldm/pipeline/openvino_backend.py): the same images as PyTorch, batch invariance, LoRAs
through it, and a cache that is rebuilt rather than trusted. Tiny models; each conversion takes a second or two."""

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from adapter_files import diffusers_pipeline, ldm_images, peft_lora_file  # noqa: E402
from ldm import Pipeline  # noqa: E402
from proc_maps import resident_kb_of_mapping  # noqa: E402
from ldm.pipeline import openvino_backend as ovb  # noqa: E402

RUN = dict(steps=3, height=32, width=32, progress=False, output_type="np")
PROMPTS = ["a turtle playing basketball", "a red apple", "a blue car"]


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One cache for the module (each conversion costs seconds); a test that spoils entries makes its own."""
    root = tmp_path_factory.mktemp("ldm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ovb.ENV_CACHE, str(root))
        yield root / "openvino"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ovb.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


@pytest.fixture(scope="module")
def torch_pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, backend="torch")


def test_openvino_draws_the_images_pytorch_draws_and_converts_once(sd1_folder, torch_pipe, cache):
    pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    assert pipe.backend == "openvino"
    for sampler in ("dpmpp_2m", "euler_a"):
        expected = torch_pipe(PROMPTS[:2], seed=3, sampler=sampler, **RUN)
        got = pipe(PROMPTS[:2], seed=3, sampler=sampler, **RUN)
        assert np.abs(got - expected).max() < 1 / 255, sampler          # float32 rounding only
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.name != "blobs")
    assert entries == ["unet", "vae"], entries          # one graph for the U-Net rows, one for the decoder
    weights = cache.glob("unet-*/model.bin")
    sizes = {path: path.stat().st_size // 1024 for path in weights}
    assert all(resident_kb_of_mapping(path) < kb // 4 for path, kb in sizes.items())   # handed back (ldm.pages)

    # a new pipeline reads the cached graphs of its default request in the background, meanwhile
    again = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    assert len(again._network._pending) == 0          # 32x32 is this model's size only when asked for
    native = dict(RUN, height=None, width=None)
    pipe(PROMPTS[0], seed=1, **native)                  # puts the native size's graphs in the cache
    again = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    assert len(again._network._pending) == 1
    np.testing.assert_array_equal(again(PROMPTS[0], seed=1, **native), pipe(PROMPTS[0], seed=1, **native))

    # a new pipeline on the same weights reads the cached graphs instead of converting again
    again = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    calls = []
    original = ovb.OpenVINONetwork._convert
    ovb.OpenVINONetwork._convert = lambda self, *a: calls.append(self.name) or original(self, *a)
    try:
        np.testing.assert_array_equal(again(PROMPTS[:2], seed=3, **RUN), pipe(PROMPTS[:2], seed=3, **RUN))
    finally:
        ovb.OpenVINONetwork._convert = original
    assert calls == []


def test_an_image_is_bitwise_the_same_alone_and_in_a_batch(sd1_folder):
    pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    for guidance in (7.5, 1.0):
        alone = pipe(PROMPTS[1], seed=11, guidance=guidance, **RUN)[0]
        batch = pipe(PROMPTS, seed=[5, 11, 7], guidance=guidance, **RUN)
        np.testing.assert_array_equal(batch[1], alone)
        assert np.abs(batch[1] - batch[0]).max() > 0.01


def test_large_maps_run_on_one_stream_with_every_thread(sd1_folder, torch_pipe, monkeypatch):
    """From ROW_STREAMS_MAX_POSITIONS latent positions a row gets one stream with all the threads (a lone row
    without a classifier-free batch would otherwise run on half the cores); the images stay PyTorch's."""
    monkeypatch.setattr(ovb, "ROW_STREAMS_MAX_POSITIONS", 16)         # RUN's 32x32 images: 4x4 latents
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    finally:
        torch.set_num_threads(previous)
    assert pipe._network.streams == 2
    for guidance in (7.5, 1.0):
        got = pipe(PROMPTS[:2], seed=3, guidance=guidance, **RUN)
        expected = torch_pipe(PROMPTS[:2], seed=3, guidance=guidance, **RUN)
        assert np.abs(got - expected).max() < 1 / 255
    assert [len(requests) for requests in pipe._network._compiled.values()] == [1]


def test_a_lora_reaches_the_compiled_graph_and_leaves_it_when_removed(sd1_folder, tmp_path):
    reference = diffusers_pipeline(sd1_folder)
    lora, _ = peft_lora_file(reference, tmp_path)
    pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    plain = ldm_images(pipe)
    handle = pipe.load_lora(lora)
    torch_pipe = Pipeline.from_pretrained(sd1_folder, backend="torch")
    torch_pipe.load_lora(lora)
    with_lora = ldm_images(pipe)
    assert np.abs(with_lora - plain).max() > 0.02                       # the LoRA changed the image
    assert np.abs(with_lora - ldm_images(torch_pipe)).max() < 1 / 255  # as PyTorch draws it
    handle.remove()
    assert np.abs(ldm_images(pipe) - plain).max() < 1e-6                # and the base graph is back


def test_a_corrupt_cache_entry_is_rebuilt_not_trusted(sd1_folder, torch_pipe, cache):
    Pipeline.from_pretrained(sd1_folder, backend="openvino")(PROMPTS[0], seed=1, **RUN)
    for xml in cache.glob("unet-*/model.xml"):
        xml.write_text("<net>truncated")
    pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    with pytest.warns(RuntimeWarning, match="does not load"):
        got = pipe(PROMPTS[0], seed=1, **RUN)
    assert np.abs(got - torch_pipe(PROMPTS[0], seed=1, **RUN)).max() < 1 / 255
    assert all(xml.read_text().startswith("<?xml") for xml in cache.glob("unet-*/model.xml"))


def test_a_graph_openvino_cannot_build_falls_back_to_pytorch_with_one_warning(sd1_folder, torch_pipe, monkeypatch,
                                                                                cache):
    def broken(self, *args):
        raise RuntimeError("no such operator")

    monkeypatch.setattr(ovb.OpenVINONetwork, "_convert", broken)
    pipe = Pipeline.from_pretrained(sd1_folder, backend="openvino")
    with pytest.warns(RuntimeWarning, match="could not compile the unet"):
        got = pipe(PROMPTS[0], seed=2, **RUN)
    np.testing.assert_array_equal(got, torch_pipe(PROMPTS[0], seed=2, **RUN))


def test_backend_names_are_checked(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        ovb.resolve_backend("tensorrt", cpu)
    with pytest.raises(ValueError, match="CPU only"):
        ovb.resolve_backend("openvino", torch.device("cuda"))
    monkeypatch.setenv(ovb.ENV_BACKEND, "torch")
    assert ovb.resolve_backend(None, cpu) == "torch"
    assert ovb.resolve_backend("openvino", cpu) == "openvino"
    monkeypatch.setenv(ovb.ENV_BACKEND, "auto")
    assert ovb.resolve_backend("auto", cpu) == "openvino"
    assert ovb.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_two_processes_converting_into_one_cache_leave_one_good_entry(sd1_folder, cache):
    import os
    import subprocess
    import sys

    script = ("import sys, numpy as np; from ldm import Pipeline; "
              "p = Pipeline.from_pretrained(sys.argv[1], backend='openvino'); "
              "np.save(sys.argv[2], p('a red apple', seed=4, steps=2, height=32, width=32, progress=False, "
              "output_type='np'))")
    env = {**os.environ, ovb.ENV_CACHE: str(cache.parent), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(sd1_folder), str(cache.parent / f"{i}.npy")],
                             env=env, stderr=subprocess.PIPE) for i in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()[-2000:]
    first, second = (np.load(cache.parent / f"{i}.npy") for i in range(2))
    np.testing.assert_array_equal(first, second)
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.name != "blobs")
    assert entries == ["unet", "vae"], entries                    # the loser's copy was dropped, not half-kept
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]   # no temporary folder left behind
