"""ldm's own safetensors reader (plain reads, one tensor at a time, converting as it goes) against the
safetensors library on the same files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoints import CheckpointError, load, save_single_file
from ldm.checkpoints.tensor_io import load_safetensors, load_tensors
from tiny_models import save_tiny_pipeline


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = {f"f.{dtype}".replace("torch.", ""): torch.randn(3, 5, generator=g).to(dtype)
              for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
    return {**floats,
            "i64": torch.arange(77, dtype=torch.int64)[None],        # a text encoder's position_ids
            "i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8, generator=g),
            "u8": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
            "bool": torch.tensor([True, False, True]),
            "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaNs and signed zeros count too)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_reads_every_dtype_bit_for_bit_like_the_safetensors_library(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(_every_dtype(), str(path))
    ours, theirs = load_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert _same(ours[name], theirs[name]), name


def test_dtype_converts_floating_point_tensors_only(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(_every_dtype(), str(path))
    theirs = load_file(str(path))
    ours = load_tensors(path, torch.float32)
    for name, value in theirs.items():
        expected = value.to(torch.float32) if value.is_floating_point() else value
        assert _same(ours[name], expected), name


def test_dtype_can_depend_on_the_tensor_name(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"vae.w": torch.randn(3), "unet.w": torch.randn(3), "ids": torch.arange(3)}, str(path))
    ours = load_tensors(path, lambda name: torch.float32 if name.startswith("vae.") else torch.bfloat16)
    assert (ours["vae.w"].dtype, ours["unet.w"].dtype, ours["ids"].dtype) == \
        (torch.float32, torch.bfloat16, torch.int64)
    assert torch.equal(ours["vae.w"], load_file(str(path))["vae.w"])


def test_a_file_cut_after_its_header_was_read_names_the_tensor(tmp_path, monkeypatch):
    """The header's size check catches a file truncated before loading; this is a file that shrinks while
    it is read (a network share, a file still being copied)."""
    import ldm.checkpoints.tensor_io as tensor_io

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(path))
    header = tensor_io.read_safetensors_header(path)
    monkeypatch.setattr(tensor_io, "read_safetensors_header", lambda p: header)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated while reading tensor 'b'"):
        load_safetensors(path)


def test_fp16_folder_loads_in_float32_and_bfloat16_like_converting_afterwards(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "fp16", family="sd1", seed=3, variant="fp16")
    stored = load_file(str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        components = load(folder, dtype=dtype)
        assert components.info.dtype == "float16"           # what the file holds, not what was asked
        state = components.unet.state_dict()
        for name, value in stored.items():
            assert _same(state[name], value.to(dtype)), (dtype, name)


def test_the_vae_can_load_in_its_own_dtype_straight_from_the_files(tmp_path):
    # Pipeline(dtype=bf16) keeps the VAE in float32: its weights come from the files, never from a bf16 copy.
    folder = save_tiny_pipeline(tmp_path / "fp32", family="sd1", seed=4)
    stored = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    components = load(folder, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert {p.dtype for p in components.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.bfloat16}
    state = components.vae.state_dict()
    assert all(torch.equal(state[name], value) for name, value in stored.items())
    assert {p.dtype for p in load(folder, dtype=torch.bfloat16).vae.parameters()} == {torch.bfloat16}


def test_a_single_file_reads_its_vae_in_float32_beside_a_bf16_unet(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "fp32", family="sd1", seed=5)
    path = tmp_path / "model.safetensors"
    save_single_file(load(folder), path)
    stored = load_file(str(path))
    components = load(path, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert {p.dtype for p in components.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in components.vae.parameters()} == {torch.float32}
    # the VAE's weights are the file's float32 ones (the folder's), not a bfloat16 copy widened again
    vae_in_folder = load(folder).vae.state_dict()
    assert all(torch.equal(components.vae.state_dict()[k], v) for k, v in vae_in_folder.items())
    assert any(k.startswith("first_stage_model.") for k in stored)
