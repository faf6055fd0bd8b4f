"""scripts/export_default.py: a trained folder becomes the shipped fp16 default model, which loads the same."""
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import export_default  # noqa: E402

from ldm.checkpoints import load  # noqa: E402


def test_export_is_fp16_without_a_tokenizer_and_reads_prompts_as_the_source(tmp_path):
    src = save_tiny_pipeline(tmp_path / "src")
    export_default.export(src, tmp_path / "out", max_mb=40, overwrite=False)
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert not list(tmp_path.glob(".out.*"))                         # no temporary folder left behind
    source, shipped = load(src), load(tmp_path / "out")
    for prompt in export_default.PROBES:
        assert torch.equal(source.text_encoder.tokenize(prompt), shipped.text_encoder.tokenize(prompt))
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    diffs = export_default.max_relative_difference(source, shipped)
    assert 0 < max(diffs.values()) < 1e-2                             # fp16 rounding, nothing more


def test_export_refuses_over_budget_and_existing_destination(tmp_path):
    src = save_tiny_pipeline(tmp_path / "src")
    with pytest.raises(SystemExit, match="over the 1 MB budget"):
        export_default.export(src, tmp_path / "out", max_mb=1, overwrite=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="--overwrite"):
        export_default.export(src, tmp_path / "out", max_mb=40, overwrite=False)
    with pytest.raises(SystemExit, match="not a model folder"):
        export_default.export(tmp_path, tmp_path / "x", max_mb=40, overwrite=False)
