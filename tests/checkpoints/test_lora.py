"""LoRA: adapters start as the identity, training touches nothing else, the file is small, and a Pipeline
loading it at scale 0 is the base model, at scale 1 the fine-tuned one (and fuse/unload behave)."""

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_base_model, unet_overrides

from ldm import Pipeline
from ldm.checkpoints.adapters.lora import UNET_TARGETS, adapters, add_lora, fuse, read_lora, unload
from ldm.train import Trainer
from ldm.train.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random model folder to fine-tune, and its data."""
    return make_base_model(tmp_path_factory.mktemp("lora"))


def _outputs(pipe, prompts=("red circle", "blue square")):
    return pipe(list(prompts), seed=3, output_type="latent", progress=False, steps=5)


def test_adapters_start_as_identity_and_reach_fused_self_attention(base):
    _, _, folder = base
    pipe = Pipeline.from_pretrained(folder)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 16)
    before = pipe.unet(x, t, ctx)
    params = add_lora(pipe.unet, rank=2)
    assert torch.equal(pipe.unet(x, t, ctx), before)                  # B = 0 at the start
    assert len(params) == 2 * len(adapters(pipe.unet))
    # the self-attention q projection is read as a weight (one fused QKV GEMM): the adapter must still count
    name = next(n for n in adapters(pipe.unet) if n.endswith("attn1.to_q"))
    with torch.no_grad():
        adapters(pipe.unet)[name].lora_B.fill_(0.1)
    assert not torch.allclose(pipe.unet(x, t, ctx), before)
    unload(pipe.unet)
    assert torch.equal(pipe.unet(x, t, ctx), before)


def test_lora_training_changes_only_adapters_and_scales_between_base_and_tuned(base, tmp_path):
    data, vae, folder = base
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, unet_overrides(
        data, vae, run, init=folder, max_steps=20, lr=1e-2, **{"lora.rank": 4, "lora.text_encoder": True,
                                                                "train_text_encoder": False, "vae_from": "null"})))
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    lora_params = {id(p) for m in (trainer.module.unet, trainer.module.text_encoder)
                   for a in adapters(m).values() for p in (a.lora_A, a.lora_B)}
    assert trained == lora_params                                      # the optimiser sees adapters only
    trainer.fit()

    unet_file = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, layer in trainer.module.unet.named_modules():            # frozen base weights untouched
        if hasattr(layer, "parametrizations"):
            assert torch.equal(layer.parametrizations.weight.original, unet_file[f"{name}.weight"])

    lora_file = run / "lora.safetensors"
    tensors, rank, alpha = read_lora(lora_file)
    assert rank == 4 and alpha == 4.0
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    assert lora_file.stat().st_size < 0.2 * (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size

    base_out = _outputs(Pipeline.from_pretrained(folder))
    pipe = Pipeline.from_pretrained(folder)
    handle = pipe.load_lora(lora_file, scale=0.0)
    assert torch.equal(_outputs(pipe), base_out)                       # scale 0: the base model exactly
    handle.set_scale(1.0)
    tuned = _outputs(pipe)
    assert (tuned - base_out).abs().max() > 1e-3                       # scale 1: the fine-tuned model...
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    ids = pipe.text_encoder.tokenize(["red circle"])
    with torch.no_grad():
        trained_pred = trainer.module(x, t, ids)
        assert torch.allclose(pipe.unet(x, t, pipe.text_encoder.encode(ids)), trained_pred, atol=1e-5)  # ...exactly
    handle.fuse()
    assert not adapters(pipe.unet) and torch.allclose(_outputs(pipe), tuned, atol=1e-4)

    pipe2 = Pipeline.from_pretrained(folder)
    pipe2.load_lora(lora_file).unload()
    assert torch.equal(_outputs(pipe2), base_out)


def test_lora_needs_a_model_and_a_readable_file(base, tmp_path):
    data, vae, _ = base
    with pytest.raises(ConfigError, match="needs init"):
        load_config(None, unet_overrides(data, vae, tmp_path / "x", **{"lora.rank": 4}))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_lora(bad)
    with pytest.raises(ValueError, match="no layers named"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, targets=UNET_TARGETS)


def test_fuse_bakes_the_scaled_delta():
    layer = torch.nn.Linear(4, 3)
    w0 = layer.weight.detach().clone()
    model = torch.nn.ModuleDict({"to_q": layer})
    add_lora(model, rank=2, alpha=1.0)
    a = adapters(model)["to_q"]
    with torch.no_grad():
        a.lora_B.fill_(0.5)
    a.scale = 0.5
    expected = w0 + 0.5 * (1.0 / 2) * a.lora_B.detach() @ a.lora_A.detach()
    fuse(model)
    assert isinstance(model["to_q"].weight, torch.nn.Parameter) and torch.allclose(model["to_q"].weight, expected)


def test_lora_format_kohya_loads_in_diffusers_with_the_same_image(base, tmp_path):
    from adapter_files import diffusers_images, diffusers_pipeline, ldm_images
    import numpy as np

    data, vae, folder = base
    run = tmp_path / "run"
    Trainer(load_config(None, unet_overrides(
        data, vae, run, init=folder, max_steps=3, lr=1e-2, **{"lora.rank": 2, "lora.format": "kohya",
                                                               "vae_from": "null"}))).fit()
    assert all(k.startswith("lora_unet_") for k in load_file(str(run / "lora.safetensors")))
    theirs = diffusers_pipeline(folder)
    theirs.load_lora_weights(str(run / "lora.safetensors"))
    theirs.fuse_lora(lora_scale=1.0)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.load_lora(run / "lora.safetensors").format == "kohya/A1111"
    assert np.abs(ldm_images(pipe) - diffusers_images(theirs)).max() <= 2 / 255
