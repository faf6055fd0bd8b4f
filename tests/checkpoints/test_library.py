"""Names, not paths: Hugging Face repo ids from the local cache (offline), and the model library of an A1111 or
ComfyUI models folder (every kind found, names and short hashes resolve, broken and ambiguous entries named)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints.library import Library, LibraryError, ModelNotCached, cached_snapshot, lora_hash, resolve_model
from library_fixtures import LAYOUTS, build_models_dir, fake_hf_cache

KW = dict(steps=2, guidance=3.0, sampler="ddim", height=32, width=32, seed=7, output_type="np", progress=False)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm-cache"))   # never the user's ~/.cache/ldm


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def models_dir(request, sd1_folder, tmp_path_factory):
    return build_models_dir(tmp_path_factory.mktemp(request.param), request.param, sd1_folder)


# -- Hugging Face repo ids ------------------------------------------------------------------------------------
def test_repo_id_loads_from_the_cache_offline_and_draws_the_folders_image(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")       # any network use would fail loudly
    snapshot = fake_hf_cache(tmp_path / "hub", "org/tiny", sd1_folder)
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    pipe = Pipeline.from_pretrained("org/tiny", cache_dir=tmp_path / "hub")
    assert pipe.source == snapshot
    np.testing.assert_array_equal(pipe("a red apple", **KW), Pipeline.from_pretrained(sd1_folder)("a red apple", **KW))


def test_revision_and_fp16_variant_as_diffusers_takes_them(sd1_folder, tmp_path):
    from tiny_models import save_tiny_pipeline

    fp16 = save_tiny_pipeline(tmp_path / "fp16", "sd1", variant="fp16")        # same seed: sd1_folder in fp16
    both = tmp_path / "both"
    shutil.copytree(sd1_folder, both)
    for f in fp16.rglob("*.fp16.safetensors"):
        shutil.copy(f, both / f.relative_to(fp16))
    fake_hf_cache(tmp_path / "hub", "org/tiny", sd1_folder, revision="a" * 40)
    fake_hf_cache(tmp_path / "hub", "org/tiny", both, revision="b" * 40)       # refs/main -> the newer one
    assert cached_snapshot("org/tiny", "a" * 40, tmp_path / "hub").name == "a" * 40
    full = Pipeline.from_pretrained("org/tiny", cache_dir=tmp_path / "hub")
    half = Pipeline.from_pretrained("org/tiny", cache_dir=tmp_path / "hub", variant="fp16")
    w_full, w_half = full.unet.conv_in.weight, half.unet.conv_in.weight
    assert w_half.dtype == torch.float32 and not torch.equal(w_full, w_half)
    assert torch.equal(w_half, w_full.half().float())          # the fp16 file's values, read as float32
    with pytest.raises(ModelNotCached, match="at revision 'v9'"):
        Pipeline.from_pretrained("org/tiny", cache_dir=tmp_path / "hub", revision="v9")


def test_a_missing_repo_id_names_the_cache_path_and_the_download_command(tmp_path):
    with pytest.raises(ModelNotCached) as e:
        Pipeline.from_pretrained("org/missing", cache_dir=tmp_path / "hub")
    assert str(tmp_path / "hub" / "models--org--missing") in str(e.value)
    assert "huggingface-cli download org/missing" in str(e.value)


@pytest.mark.parametrize("name", ["org/../../etc", "/org/name", "org/name/../../x", "~/org", "org\\name"])
def test_paths_in_disguise_are_not_repo_ids(name, tmp_path):
    with pytest.raises(LibraryError, match="does not exist"):
        resolve_model(name, None, cache_dir=tmp_path)


# -- the library -----------------------------------------------------------------------------------------------
def test_every_kind_is_found_with_its_name_family_and_size(models_dir):
    found = {(e.kind, e.name): e for e in Library(models_dir).entries}
    assert set(found) == {("checkpoint", "sub/tiny"), ("checkpoint", "tiny-diffusers"), ("lora", "style"),
                          ("vae", "tiny-vae"), ("controlnet", "tiny-control"), ("embedding", "shiny")}
    assert found["checkpoint", "sub/tiny"].family == found["checkpoint", "tiny-diffusers"].family == "sd1"
    assert not any(e.problem for e in found.values())
    assert found["lora", "style"].size == found["lora", "style"].path.stat().st_size


def test_names_titles_and_short_hashes_resolve(models_dir):
    library = Library(models_dir)
    entry = library.find("checkpoint", "sub/tiny")
    for name in ("tiny", "sub/tiny.safetensors", "sub_tiny"):
        assert library.find("checkpoint", name) is entry
    assert entry.known_hash is None and entry.title == "sub/tiny.safetensors"      # listing never hashes
    digest = entry.hash()
    assert len(digest) == 10 and entry.title == f"sub/tiny.safetensors [{digest}]"
    assert library.find("checkpoint", entry.title) is entry and library.find("checkpoint", digest) is entry
    lora = library.find("lora", "style")
    assert library.find("lora", lora_hash(lora.path)) is lora                      # A1111's 12-digit addnet hash
    assert Library(models_dir).find("checkpoint", "sub/tiny").known_hash == digest  # remembered on disk
    with pytest.raises(LibraryError, match="no lora named 'styel'.*did you mean 'style'"):
        library.find("lora", "styel")


def test_broken_files_are_listed_and_same_names_are_ambiguous(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir, root, symlinks=True)
    loras = root / LAYOUTS["a1111" if (root / "models" / "Lora").is_dir() else "comfyui"]["lora"]
    data = (loras / "style.safetensors").read_bytes()
    (loras / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (loras / "other").mkdir()
    (loras / "other" / "style.safetensors").write_bytes(data)
    library = Library(root)
    cut = library.find("lora", "cut")
    assert cut.problem and "truncated" in cut.problem
    with pytest.raises(LibraryError) as e:
        library.find("lora", "style")          # the stem of other/style too
    assert str(loras / "other" / "style.safetensors") in str(e.value) and "ambiguous" in str(e.value)
    assert library.find("lora", "other/style").path == loras / "other" / "style.safetensors"


def test_names_work_in_the_python_api(models_dir):
    pipe = Pipeline.from_pretrained("tiny", models_dir=models_dir)
    library = pipe.library
    assert pipe.source == library.find("checkpoint", "tiny").path
    assert "shiny" in pipe.text_encoder.tokenizer.get_vocab()          # the library's embeddings are loaded
    tagged = pipe("a red apple <lora:style:0.8>", **KW)
    handle = pipe.load_lora(library.find("lora", "style").path, 0.8)
    np.testing.assert_array_equal(tagged, pipe("a red apple", **KW))
    handle.remove()
    assert not np.array_equal(tagged, pipe("a red apple", **KW))
    pipe.load_vae("tiny-vae")
    assert pipe.vae_file.path == library.find("vae", "tiny-vae").path
    unit = pipe.load_control("tiny-control")
    assert unit.kind == "ControlNet"
