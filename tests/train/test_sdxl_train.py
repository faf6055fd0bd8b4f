"""Fine-tuning SDXL on tiny random models: the U-Net gets bigG's pooled embedding and the size time ids, a LoRA run
(``ldm train --init FILE --lora 8``) changes only its adapters and its file loads back, a full fine-tune writes an
SDXL folder that ldm and diffusers load."""
import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_shapes

from ldm import Pipeline
from ldm.checkpoints import load, save_single_file
from ldm.checkpoints.adapters.lora import adapters
from ldm.train import Trainer, train_main
from ldm.train.config import load_config
from tiny_sdxl import save_tiny_sdxl

pytestmark = pytest.mark.usefixtures("single_thread")
COMMON = ["data.resolution=16", "batch_size=2", "lr=1e-2", "lr_warmup_steps=1", "data.caption_dropout=0.0",
          "log_every=1", "progress=false", "checkpoint_every=0", "defaults.height=16", "defaults.width=16",
          "defaults.steps=2", "defaults.sampler=ddim"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_train")
    folder = save_tiny_sdxl(root / "base", seed=7)
    save_single_file(load(folder), root / "base.safetensors")
    return make_shapes(root / "data"), folder, root / "base.safetensors"


def losses(run) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def record_unet_calls(trainer) -> list[dict]:
    calls, forward = [], trainer.module._unet_forward

    def spy(x, t, context, **added):
        calls.append({"context": context.shape, **{k: v.detach().clone() for k, v in added.items()}})
        return forward(x, t, context, **added)

    trainer.module._unet_forward = spy
    return calls


def test_lora_from_a_single_file(sdxl, tmp_path, monkeypatch):
    data, _, file = sdxl
    run = tmp_path / "lora"
    seen = []
    original = Trainer.fit

    def fit(self):
        seen.append(record_unet_calls(self))
        result = original(self)
        seen.append(base_weights(self.module.unet))
        return result

    monkeypatch.setattr(Trainer, "fit", fit)
    assert train_main(["--data", str(data), "--output", str(run), "--init", str(file), "--lora", "8",
                       "--max-steps", "3", *COMMON]) == 0
    calls, after = seen
    assert len(calls) == 3 and all(math.isfinite(v) for v in losses(run))
    # bigG's pooled embedding and (original, crop, target) = (16, 16), (0, 0), (16, 16): the training size
    assert calls[0]["context"] == (2, 77, 64 + 128) and calls[0]["text_embeds"].shape == (2, 128)
    torch.testing.assert_close(calls[0]["time_ids"], torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    pipe = Pipeline.from_pretrained(file)
    base = pipe("red circle", seed=0, output_type="np", progress=False)
    handle = pipe.load_lora(run / "lora.safetensors")
    tuned = pipe("red circle", seed=0, output_type="np", progress=False)
    assert np.abs(tuned - base).max() > 1e-3                       # the trained adapters change the image
    handle.unload()
    assert np.abs(pipe("red circle", seed=0, output_type="np", progress=False) - base).max() == 0
    # only the adapters trained: after training, the U-Net's own weights are still the file's
    assert after.keys() == (first := load(file).unet.state_dict()).keys()
    assert all(torch.equal(after[k], first[k]) for k in first)


def base_weights(unet) -> dict[str, torch.Tensor]:
    """A LoRA-adapted U-Net's own weights, under their plain names (parametrize keeps them as ``.original``)."""
    return {k.replace(".parametrizations.weight.original", ".weight"): v.detach().clone()
            for k, v in unet.state_dict().items() if ".lora_" not in k and not k.endswith(".parametrizations.weight.0")}


def test_kohya_lora_on_both_text_encoders(sdxl, tmp_path):
    """``lora.text_encoder=true`` on SDXL adapts CLIP-L and bigG; the kohya file names them lora_te1_/lora_te2_
    as sd-scripts does, and it loads back in ldm and in diffusers."""
    from diffusers import StableDiffusionXLPipeline

    data, folder, _ = sdxl
    run = tmp_path / "kohya"
    assert train_main(["--data", str(data), "--output", str(run), "--init", str(folder), "--lora", "4",
                       "--lora-format", "kohya", "--max-steps", "2", "lora.text_encoder=true", *COMMON]) == 0
    keys = load_file(str(run / "lora.safetensors")).keys()
    assert {k.split("_text_model_")[0] for k in keys if "_text_model_" in k} == {"lora_te1", "lora_te2"}
    pipe = Pipeline.from_pretrained(folder)
    base = pipe("red circle", seed=0, output_type="np", progress=False)
    handle = pipe.load_lora(run / "lora.safetensors")
    assert handle.layers == len({k.split(".")[0] for k in keys})         # every layer found its place in ldm
    theirs = StableDiffusionXLPipeline.from_pretrained(folder)
    theirs.load_lora_weights(str(run / "lora.safetensors"))             # diffusers reads sd-scripts' SDXL names
    assert np.abs(pipe("red circle", seed=0, output_type="np", progress=False) - base).max() > 1e-3


def test_full_fine_tune_trains_both_text_encoders_and_writes_an_sdxl_folder(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    data, folder, _ = sdxl
    run = tmp_path / "full"
    trainer = Trainer(load_config(None, ["stage=unet", f"data.path={data}", f"output={run}", f"init={folder}",
                                         "max_steps=2", "lr=1e-3", *COMMON]))
    assert not adapters(trainer.module.unet)
    calls = record_unet_calls(trainer)
    trainer.fit()
    assert len(calls) == 2 and calls[1]["time_ids"].shape == (2, 6)
    first, tuned = load(folder), load(run / "model")
    assert tuned.info.family == "sdxl" and tuned.pipeline_config["force_zeros_for_empty_prompt"]
    for old, new in zip(first.text_encoders, tuned.text_encoders):
        changed = [k for k, v in new.weights().items() if not torch.equal(v, old.weights()[k])]
        assert changed                                              # each encoder received gradients
    theirs = StableDiffusionXLPipeline.from_pretrained(run / "model")
    assert torch.equal(theirs.text_encoder_2.text_projection.weight, tuned.text_encoder_2.weights()[
        "text_projection.weight"])
