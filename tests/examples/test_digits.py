"""The digits worked example: guidance must make a judge name the requested digit far more often than chance.

One small model is trained for a few seconds (module fixture) and sampled under several guidance settings from the
same noise.  If ldm.guidance.classifier_free or ldm.guidance.classifier did nothing (returned the unguided or the
conditional denoiser), the guided accuracies below would fall to the unguided ones and the tests would fail.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from ldm.examples.digits import NULL_CLASS, DigitsConfig, load_digits, threads  # noqa: E402
from ldm.examples.digits_eval import (SampleConfig, Setting, evaluate, guided, real_accuracy,  # noqa: E402
                                      requested_classes, train_all)

TINY = DigitsConfig(width=128, blocks=2, denoiser_steps=400, classifier_steps=250, batch_size=128, lr=3e-3,
                    ema_decay=0.98)
SAMPLING = SampleConfig("dpmpp_2m", steps=12)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models():
    with threads(1):
        yield train_all(TINY)


@pytest.fixture(scope="module")
def accuracy(models):
    settings = [Setting("unconditional"), Setting("cfg", 1.0), Setting("cfg", 4.0), Setting("classifier", 4.0)]
    with threads(1):
        results = evaluate(models, settings, per_class=20, sampling=SAMPLING, seed=1)
    return {(r.setting.kind, r.setting.scale): r.accuracy for r in results}


def test_data_is_scaled_and_split_without_overlap():
    data = load_digits(held_out=0.2, seed=0)
    assert data.train_x.shape[1:] == (1, 8, 8) and len(data.train_x) + len(data.test_x) == 1797
    assert data.train_x.min() == -1.0 and data.train_x.max() == 1.0
    assert set(data.test_y.tolist()) == set(range(10))
    train = {tuple(row) for row in data.train_x.flatten(1).tolist()}
    assert sum(tuple(row) in train for row in data.test_x.flatten(1).tolist()) < 5  # (a few true duplicates)


def test_judge_reads_real_held_out_digits(models):
    assert real_accuracy(models) > 0.9


def test_unconditional_model_ignores_the_requested_class(accuracy):
    assert accuracy[("unconditional", 1.0)] < 0.3  # ≈ chance (10 %): the null class carries no label


def test_classifier_free_guidance_beats_unguided_and_conditional(accuracy):
    cfg = accuracy[("cfg", 4.0)]
    assert cfg >= accuracy[("unconditional", 1.0)] + 0.5
    assert cfg >= accuracy[("cfg", 1.0)] + 0.25  # guidance adds to what the conditional branch does alone
    assert cfg >= 0.7


def test_classifier_guidance_steers_the_unconditional_model(accuracy):
    assert accuracy[("classifier", 4.0)] >= accuracy[("unconditional", 1.0)] + 0.4


def test_noisy_classifier_gradient_points_towards_its_class(models):
    """log p(y | x) rises along its own gradient: a small step along ∇ log p increases it at every σ."""
    x = torch.randn(10, 1, 8, 8) * 2
    y = torch.arange(10)
    for sigma in (0.1, 1.0, 5.0):
        s = torch.full((10,), sigma)
        log_prob = models.classifier.log_prob(models.schedule, y)
        x_in = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(x_in, s).sum(), x_in)
        assert (log_prob(x + 1e-2 * grad / grad.norm(), s) > log_prob(x, s)).all()


def test_guided_denoisers_take_classes_and_keep_shapes(models):
    y = requested_classes(1)
    x, sigma = torch.randn(10, 1, 8, 8), torch.full((10,), 2.0)
    outputs = {kind: guided(models, Setting(kind, 2.0), y)(x, sigma) for kind in ("unconditional", "cfg",
                                                                                  "classifier")}
    assert all(o.shape == x.shape and torch.isfinite(o).all() for o in outputs.values())
    assert not torch.allclose(outputs["cfg"], outputs["unconditional"])
    assert not torch.allclose(outputs["classifier"], outputs["unconditional"])
    null = models.denoiser(x, sigma, y=torch.full_like(y, NULL_CLASS))
    assert torch.equal(outputs["unconditional"], null)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("example_digits", ROOT / "scripts" / "example_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_end_to_end(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path), "--denoiser-steps", "20", "--classifier-steps", "10",
                        "--per-class", "2", "--steps", "3", "--samplers", "dpmpp_2m", "euler", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| digits judged | `dpmpp_2m` | `euler` |" in out and "real held-out digits" in out
    assert out.count("| generated (20), ") == 6
    for name in ("digits_forward_reverse.png", "digits_denoising.png", "digits_samples.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_script_rejects_bad_values(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--per-class", "0"])
    assert e.value.code != 0 and "--per-class must be >= 1" in capsys.readouterr().err
