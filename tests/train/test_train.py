"""The trainer on tiny models: it learns, it resumes exactly, 2 processes = 1, bad input is reported clearly."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY_VAE, dies_at, make_shapes, make_vae, model_weights, unet_overrides

from ldm.train import Trainer, train_main
from ldm.train.config import load_config

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes(root / "data")
    return data, make_vae(root / "vae", data)


def _losses(run: Path) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _train(overrides, resume=False):
    return Trainer(load_config(None, overrides), resume=resume).fit()


@pytest.mark.slow
def test_tiny_model_overfits_and_samples_its_training_images(shapes, tmp_path):
    from ldm import Pipeline
    from ldm.train.data import Transform, scan

    data, vae = shapes
    run = tmp_path / "run"
    _train(unet_overrides(data, vae, run, max_steps=300, lr=2e-3, batch_size=8, log_every=30,
                          prediction_type="v_prediction"))
    losses = _losses(run)
    assert losses[-1] < 0.3 * losses[0], losses

    # Compared in latent space: the fixture's VAE is untrained, so its decoder makes every image look alike.
    pipe = Pipeline.from_pretrained(run / "model")
    records = scan(data)
    pixels = torch.cat([Transform()(r.path, (16, 16), torch.Generator())[None] for r in records])
    targets = pipe.encode_images(pixels)                                   # the training latents
    samples = torch.cat([pipe(r.captions[0], seed=1, output_type="latent", progress=False) for r in records])
    dist = ((samples[:, None] - targets[None]) ** 2).mean(dim=(2, 3, 4))   # sample i vs training image j
    own = dist.diagonal()
    others = dist.masked_fill(torch.eye(len(records), dtype=torch.bool), float("inf")).min(dim=1).values
    assert (own < 0.5 * others).all(), dist


def test_vae_stage_learns_and_measures_its_latent_scale(shapes, tmp_path):
    from ldm.train.build import load_vae

    data, _ = shapes
    run = tmp_path / "vae"
    _train(["stage=vae", f"data.path={data}", f"output={run}", "data.resolution=16", f"model.vae={TINY_VAE}",
            "max_steps=60", "batch_size=4", "lr=3e-3", "log_every=5", "progress=false", "validation.every=60"])
    losses = _losses(run)
    assert losses[-1] < 0.5 * losses[0], losses
    vae = load_vae(run / "model")
    assert vae.config.scaling_factor != 0.18215 and (run / "samples" / "step-00000060.png").is_file()


def test_decoder_only_vae_fine_tune_keeps_the_latents_and_the_model_around_it(shapes, tmp_path):
    from ldm.checkpoints import load
    from ldm.train.config import ConfigError

    data, vae = shapes
    _train(unet_overrides(data, vae, tmp_path / "model", max_steps=2))
    init = load(tmp_path / "model" / "model")
    run = tmp_path / "decoder"
    common = ["stage=vae", f"data.path={data}", f"output={run}", "data.resolution=16", "batch_size=4",
              "log_every=5", "progress=false", "validation.every=1000", "train_vae_encoder=false"]
    with pytest.raises(ConfigError, match="train_vae_encoder=false.*init=MODEL"):
        load_config(None, common + ["max_steps=1"])
    _train(common + [f"init={tmp_path / 'model' / 'model'}", "max_steps=60", "lr=3e-3"])
    losses = _losses(run)
    assert losses[-1] < 0.7 * losses[0], losses
    tuned = load(run / "model")                                     # the whole model, its VAE replaced
    before, after = init.vae.state_dict(), tuned.vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert tuned.vae.config.scaling_factor == init.vae.config.scaling_factor
    assert all(torch.equal(v, tuned.unet.state_dict()[k]) for k, v in init.unet.state_dict().items())


def test_resume_is_exact(shapes, tmp_path):
    data, vae = shapes
    extra = dict(max_steps=6, checkpoint_every=3, ema_decay=0.9, prediction_type="v_prediction", snr_gamma=5.0,
                 offset_noise=0.1, **{"data.augment": True, "data.augment_variants": 2,
                                      "data.caption_dropout": 0.3})
    _train(unet_overrides(data, vae, tmp_path / "straight", **extra))

    killed = dies_at(Trainer(load_config(None, unet_overrides(data, vae, tmp_path / "killed", **extra))), 4)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-00000003"]
    _train(unet_overrides(data, vae, tmp_path / "killed", **extra), resume=True)

    a, b = model_weights(tmp_path / "straight" / "model"), model_weights(tmp_path / "killed" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "killed")


def test_gradient_accumulation_matches_a_bigger_batch(shapes, tmp_path):
    data, vae = shapes
    # Adam divides by sqrt(v): where gradients are ~0, summation-order noise is amplified; a small lr keeps
    # the resulting weight differences at the 1e-6 level.
    _train(unet_overrides(data, vae, tmp_path / "big", max_steps=3, batch_size=4, lr=1e-4))
    _train(unet_overrides(data, vae, tmp_path / "accum", max_steps=3, batch_size=2, grad_accum=2, lr=1e-4))
    a, b = model_weights(tmp_path / "big" / "model"), model_weights(tmp_path / "accum" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_the_same_names(shapes, tmp_path):
    data, vae = shapes
    _train(unet_overrides(data, vae, tmp_path / "eager", max_steps=3, batch_size=4, lr=1e-4))
    _train(unet_overrides(data, vae, tmp_path / "compiled", max_steps=3, batch_size=4, lr=1e-4, compile=True))
    a, b = model_weights(tmp_path / "eager" / "model"), model_weights(tmp_path / "compiled" / "model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(shapes, tmp_path):
    data, vae = shapes
    _train(unet_overrides(data, vae, tmp_path / "one", max_steps=3, batch_size=4, lr=1e-4))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "ldm.train", "--output", str(tmp_path / "two"),
           *unet_overrides(data, vae, tmp_path / "two", max_steps=3, batch_size=2, lr=1e-4)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = model_weights(tmp_path / "one" / "model"), model_weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5
    state = (tmp_path / "two" / "checkpoints" / "step-00000003" / "state.json").read_text()
    assert '"world_size": 2' in state


def test_bad_input_is_one_clear_line(shapes, tmp_path, capsys):
    data, vae = shapes
    assert train_main(["--output", str(tmp_path / "o"), *unet_overrides(data, vae, tmp_path / "o"),
                       "learning_rat=1"]) == 2
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train_main(["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o2"), "stage=vae"]) == 2
    assert "no captioned images in" in capsys.readouterr().err
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    (nocap / "x.png").write_bytes((data / "0.png").read_bytes())
    assert train_main(["--data", str(nocap), "--output", str(tmp_path / "o3"), "stage=vae"]) == 2
    assert "x.png" in capsys.readouterr().err
    assert train_main(["--data", str(data), "--output", str(tmp_path / "o4"), "stage=unet"]) == 2
    assert "vae_from" in capsys.readouterr().err


def test_existing_checkpoints_need_resume(shapes, tmp_path):
    data, vae = shapes
    _train(unet_overrides(data, vae, tmp_path / "r", max_steps=2))
    with pytest.raises(ValueError, match="--resume"):
        Trainer(load_config(None, unet_overrides(data, vae, tmp_path / "r", max_steps=4)))


def test_frozen_text_encoder_is_cached_and_unchanged(shapes, tmp_path):
    data, vae = shapes
    trainer = Trainer(load_config(None, unet_overrides(data, vae, tmp_path / "f", max_steps=3,
                                                       train_text_encoder=False)))
    before = {k: v.clone() for k, v in trainer.module.text_encoder.weights().items()}
    trainer.fit()
    after = trainer.module.text_encoder.weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(trainer.stage.contexts) == sorted(["red circle", "blue square", "green circle", "yellow square"])
