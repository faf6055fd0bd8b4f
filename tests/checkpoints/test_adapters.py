"""LoRA files as diffusers/PEFT and kohya's sd-scripts write them: the image equals diffusers'
``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` (DDIM, same latents) within 2/255; removal is exact;
several stack; a LoRA really changes the image."""
import numpy as np
import pytest
import torch
from adapter_files import diffusers_images, diffusers_pipeline, ldm_images, peft_lora_file, randomize
from tiny_models import save_tiny_pipeline

from ldm import Pipeline
from ldm.checkpoints.adapters.kohya import save_kohya
from ldm.checkpoints.adapters.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, adapters

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "model", "sd2", seed=1)


def _reference(folder, lora, scale):
    theirs = diffusers_pipeline(folder)
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=scale)
    return diffusers_images(theirs)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_peft_lora_matches_diffusers(family, sd1_folder, sd2_folder, tmp_path):
    folder = sd1_folder if family == "sd1" else sd2_folder
    lora, _ = peft_lora_file(diffusers_pipeline(folder), tmp_path)
    expected = _reference(folder, lora, 0.7)
    pipe = Pipeline.from_pretrained(folder)
    base = ldm_images(pipe)
    handle = pipe.load_lora(lora, scale=0.7)
    assert handle.format == "diffusers/PEFT" and handle.layers > 40
    ours = ldm_images(pipe)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - base).max() > 0.05                      # the LoRA changes the image: parity is not vacuous
    handle.set_scale(0.0, group="text_encoder")                  # ... and so does its text-encoder part alone
    assert np.abs(ldm_images(pipe) - ours).max() > 0.02
    handle.remove()
    assert np.array_equal(ldm_images(pipe), base)


def test_kohya_file_from_ldm_training_adapters_matches_diffusers(sd1_folder, tmp_path):
    trained = Pipeline.from_pretrained(sd1_folder, lean=False)
    params = add_lora(trained.unet, 4, 2.0, UNET_TARGETS) + add_lora(trained.text_encoder.model, 4, 2.0,
                                                                     TEXT_TARGETS)
    randomize(params, seed=5)
    path = save_kohya(tmp_path / "style.safetensors", {"unet": trained.unet, "text_encoder": trained.text_encoder.model})
    with_adapters = ldm_images(trained)                            # ldm's own parametrized forward
    expected = _reference(sd1_folder, path, 1.0)
    pipe = Pipeline.from_pretrained(sd1_folder)
    handle = pipe.load_lora(path)
    assert handle.format == "kohya/A1111"
    ours = ldm_images(pipe)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - with_adapters).max() <= 2 / 255


def test_kohya_file_from_diffusers_converter_loads(sd1_folder, tmp_path):
    """diffusers' PEFT -> kohya converter writes ``lora_unet_`` / ``lora_te1_`` keys with alpha = rank."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    _, unet_sd = peft_lora_file(diffusers_pipeline(sd1_folder), tmp_path / "peft")
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_sd.items()})
    assert any(k.startswith("lora_unet_") for k in kohya)
    path = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    expected = _reference(sd1_folder, path, 0.5)
    pipe = Pipeline.from_pretrained(sd1_folder)
    pipe.load_lora(path, scale=0.5)
    assert np.abs(ldm_images(pipe) - expected).max() <= 2 / 255


def test_loras_stack_and_come_off_in_any_order_exactly(sd1_folder, tmp_path):
    lora_a, _ = peft_lora_file(diffusers_pipeline(sd1_folder), tmp_path / "a", seed=1)
    lora_b, _ = peft_lora_file(diffusers_pipeline(sd1_folder), tmp_path / "b", seed=2, rank=2)
    pipe = Pipeline.from_pretrained(sd1_folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.weights().items()}
    base = ldm_images(pipe)
    a = pipe.load_lora(lora_a, scale=0.6)
    only_a = ldm_images(pipe)
    b = pipe.load_lora(lora_b, scale=0.4)
    both = ldm_images(pipe)
    a.remove()
    only_b = ldm_images(pipe)
    assert len({round(float(np.abs(x - base).max()), 4) for x in (only_a, both, only_b)}) == 3
    a = pipe.load_lora(lora_a, scale=0.6)
    assert np.abs(ldm_images(pipe) - both).max() <= 1e-5           # same sum, other order
    b.remove()
    assert np.abs(ldm_images(pipe) - only_a).max() <= 1e-5
    pipe.load_lora(lora_b)
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.weights().items())
    assert np.array_equal(ldm_images(pipe), base)
    assert not adapters(pipe.unet)


def test_scale_zero_is_the_base_and_fuse_keeps_the_delta(sd1_folder, tmp_path):
    lora, _ = peft_lora_file(diffusers_pipeline(sd1_folder), tmp_path)
    pipe = Pipeline.from_pretrained(sd1_folder)
    base = ldm_images(pipe)
    handle = pipe.load_lora(lora, scale=0.0)
    assert np.array_equal(ldm_images(pipe), base)
    handle.set_scale(1.0)
    tuned = ldm_images(pipe)
    handle.fuse()
    pipe.unload_lora()                                             # nothing left to unload: fused stays
    assert np.abs(ldm_images(pipe) - tuned).max() <= 1e-5
