"""Embeddings and bad input: textual inversion equals diffusers' load_textual_inversion; another
architecture's LoRA, a truncated file, a malicious pickle and an unknown format fail with one clear error."""
import numpy as np
import pytest
import torch
from adapter_files import diffusers_images, diffusers_pipeline, ldm_images, peft_lora_file
from safetensors.torch import save_file
from tiny_models import save_tiny_pipeline

from ldm import Pipeline
from ldm.checkpoints.tensor_io import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("fmt", ["a1111_pt", "a1111_safetensors", "diffusers"])
def test_textual_inversion_matches_diffusers(fmt, sd1_folder, tmp_path):
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    path = tmp_path / ("emb.pt" if fmt == "a1111_pt" else "emb.safetensors")
    if fmt == "a1111_pt":
        torch.save({"string_to_param": {"*": vectors}, "name": "emb", "step": 100}, path)
    elif fmt == "a1111_safetensors":
        save_file({"emb_params": vectors}, str(path))
    else:
        save_file({"<emb>": vectors}, str(path))
    prompts = ["a photo of <emb> on a table", "a blue square"]
    theirs = diffusers_pipeline(sd1_folder)
    if fmt != "a1111_pt":
        theirs.load_textual_inversion(str(path), token="<emb>")
    else:
        theirs.load_textual_inversion({"<emb>": vectors}, token="<emb>")  # diffusers' unpickler is not weights-only
    expected = diffusers_images(theirs, prompts)
    pipe = Pipeline.from_pretrained(sd1_folder)
    base = ldm_images(pipe, prompts)
    assert pipe.load_textual_inversion(path, token="<emb>") == ["<emb>"]
    ours = ldm_images(pipe, prompts)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours[0] - base[0]).max() > 0.02


def test_sd2_lora_on_sd1_names_shapes(sd1_folder, tmp_path):
    sd2 = save_tiny_pipeline(tmp_path / "sd2", "sd2")
    lora, _ = peft_lora_file(diffusers_pipeline(sd2), tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"(?s)pytorch_lora_weights.safetensors .*expected \(32, 32\), found \(64, 64\)"):
        Pipeline.from_pretrained(sd1_folder).load_lora(lora)


def test_sdxl_keys_missing_layers_strict_and_not(sd1_folder, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)}, str(path))
    pipe = Pipeline.from_pretrained(sd1_folder)
    with pytest.raises(CheckpointError, match="this model has no text_encoder_2"):
        pipe.load_lora(path)
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        assert pipe.load_lora(path, strict=False).layers == 1


def test_truncated_unknown_and_malicious_files(sd1_folder, tmp_path):
    pipe = Pipeline.from_pretrained(sd1_folder)
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        pipe.load_lora(cut)
    other = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, str(other))
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors: not an adapter file.*out\.2\.weight"):
        pipe.load_lora(other)

    class Payload:
        def __reduce__(self):
            return (print, ("PAYLOAD RAN",))

    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        pipe.load_textual_inversion(evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        pipe.load_lora(evil)
