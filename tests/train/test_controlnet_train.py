"""stage=controlnet on tiny models: only the ControlNet learns, the base model stays bit-identical, the output loads
with load_control and steers a draw, a killed run resumes exactly, control images come from the data or canny."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from train_fixtures import dies_at, make_base_model, make_shapes, model_weights

from ldm.train import Trainer
from ldm.train.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(data, a tiny random model folder) for the ControlNets to steer."""
    data, _, model = make_base_model(tmp_path_factory.mktemp("controlnet"))
    return data, model


def _overrides(data, model, out, **extra):
    values = {"stage": "controlnet", "init": model, "data.path": data, "output": out, "data.resolution": 16,
              "batch_size": 4, "lr": 1e-3, "lr_schedule": "constant", "max_steps": 4, "log_every": 1,
              "progress": False, "checkpoint_every": 0, "data.caption_dropout": 0.5, "defaults.height": 16,
              "defaults.width": 16, "defaults.steps": 4, "defaults.guidance": 2.0, "defaults.sampler": "ddim",
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _losses(run) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_only_the_controlnet_learns_and_its_folder_steers_the_pipeline(base, tmp_path):
    from ldm import Control, Pipeline
    from ldm.checkpoints import load

    data, model = base
    trainer = Trainer(load_config(None, _overrides(data, model, tmp_path / "run", **{"validation.every": 4})))
    start = {k: v.clone() for k, v in trainer.module.controlnet.state_dict().items()}
    zeros = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    assert all(not v.any() for k, v in start.items() if k.startswith(zeros))   # zero convs start at zero
    out = trainer.fit()

    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    learned = trainer.module.controlnet.state_dict()
    assert any(learned[k].abs().max() > 0 for k in learned if k.startswith("controlnet_down_blocks."))
    assert any(not torch.equal(start[k], learned[k]) for k in learned if k.startswith("down_blocks."))
    files = load(model)    # the frozen base: the trainer's networks still equal the files, bit for bit
    for name in ("unet", "text_encoder", "vae"):
        saved, live = getattr(files, name).state_dict(), getattr(trainer.stage.components, name).state_dict()
        assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved), name
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()

    pipe = Pipeline.from_pretrained(model)
    unit = pipe.load_control(out)
    assert unit.kind == "ControlNet" and unit.name == "controlnet"
    edges = Image.new("RGB", (16, 16))
    ImageDraw.Draw(edges).rectangle((3, 3, 12, 12), outline=(255, 255, 255))
    options = dict(steps=4, seed=3, height=16, width=16, sampler="ddim", output_type="latent", progress=False)
    steered = pipe("red circle", control=Control(unit, edges, scale=20.0), **options)
    plain = pipe("red circle", **options)
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)


def test_a_killed_run_resumes_exactly(base, tmp_path):
    data, model = base
    extra = {"max_steps": 4, "checkpoint_every": 2, "ema_decay": 0.9}
    Trainer(load_config(None, _overrides(data, model, tmp_path / "straight", **extra))).fit()
    killed = dies_at(Trainer(load_config(None, _overrides(data, model, tmp_path / "killed", **extra))), 3)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    Trainer(load_config(None, _overrides(data, model, tmp_path / "killed", **extra)), resume=True).fit()
    a, b = model_weights(tmp_path / "straight" / "controlnet"), model_weights(tmp_path / "killed" / "controlnet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "killed")


def test_control_images_from_the_data_or_canny(base, tmp_path):
    from ldm.pipeline.preprocess import canny
    from ldm.train.control_data import Hints
    from ldm.train.data import Transform, load_rgb, scan

    data, model = base
    records = scan(data)
    canny_hints = Hints.for_records(records, data, "conditioning_image", 100, 200)
    pixels, hint = canny_hints(Transform(), records[0], (16, 16), torch.Generator())
    expected = torch.from_numpy(np.array(canny(load_rgb(records[0].path)).convert("L")))
    assert pixels.shape == (3, 16, 16) and torch.equal(hint[0], expected)

    paired = tmp_path / "paired"
    make_shapes(paired)
    rows = [json.loads(line) for line in (paired / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(paired / f"c{i}.png")
        row["conditioning_image"] = f"c{i}.png"
    (paired / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "paired_run"
    trainer = Trainer(load_config(None, _overrides(paired, model, run, max_steps=1)))
    sample = trainer.dataset[(1, 0)]
    assert sample["hint"].shape == (3, 16, 16) and sample["hint"][0].float().mean() == 40
    trainer.fit()

    rows[2].pop("conditioning_image")
    (paired / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="1 of 4 images .* have no 'conditioning_image'"):
        Trainer(load_config(None, _overrides(paired, model, tmp_path / "bad")))
    with pytest.raises(ConfigError, match="needs init=MODEL"):
        load_config(None, ["stage=controlnet"])


def test_from_unet_copies_as_diffusers_does(sd1_folder):
    """ldm's ControlNet.from_unet and diffusers' ControlNetModel.from_unet agree on every tensor but the hint
    embedding's randomly initialised convs (their last conv is zero in both)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ldm import Pipeline
    from ldm.models.controlnet import ControlNet

    ours = ControlNet.from_unet(Pipeline.from_pretrained(sd1_folder).unet, latent_factor=2).state_dict()
    theirs = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(sd1_folder / "unet"),
                                       conditioning_embedding_out_channels=(16, 32)).state_dict()
    assert ours.keys() == theirs.keys()
    random_init = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")
    assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours if not k.startswith(random_init))
