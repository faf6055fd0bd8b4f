"""Tiny datasets, models and configs for the trainer tests (test_train.py, test_lora.py).

Images are 16x16 shapes on white; the VAE downsamples 2x (8x8x4 latents); the U-Net has two levels of 16 and
32 channels; the text encoder is one 16-wide layer over CLIP's full vocabulary. A training step takes
milliseconds, so a test can afford a few hundred.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

SHAPES = {"red circle": ((220, 30, 30), "ellipse"), "blue square": ((30, 60, 220), "rectangle"),
          "green circle": ((30, 170, 40), "ellipse"), "yellow square": ((230, 190, 20), "rectangle")}

TINY_VAE = "{block_out_channels: [16, 16], layers_per_block: 1, norm_num_groups: 8, latent_channels: 4}"
TINY_UNET = ("{block_out_channels: [16, 32], layers_per_block: 1, down_block_types: [DownBlock2D, "
             "CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D, UpBlock2D], attention_head_dim: 2, "
             "norm_num_groups: 8}")
TINY_TEXT = "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}"


def make_shapes(root: Path, size: int = 16) -> Path:
    """Four captioned images in the metadata.jsonl layout."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (caption, (color, kind)) in enumerate(SHAPES.items()):
        im = Image.new("RGB", (size, size), (255, 255, 255))
        m = size // 5
        getattr(ImageDraw.Draw(im), kind)((m, m, size - m - 1, size - m - 1), fill=color)
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def make_vae(folder: Path, data: Path) -> Path:
    """An untrained (seeded) tiny VAE with a measured latent scale, saved as a stage-"vae" output."""
    from ldm.train.data import Transform, scan
    from ldm.models.vae import AutoencoderKL, VAEConfig
    from ldm.train.build import latent_scale, write_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                                  sample_size=16)).eval()
    with torch.no_grad():   # a near-deterministic posterior, as training with a small KL weight gives
        vae.quant_conv.bias[vae.config.latent_channels:] = -30.0
    x = torch.stack([Transform()(r.path, (16, 16), torch.Generator()) for r in scan(data)])
    vae.config.scaling_factor = latent_scale(vae, x)
    write_vae(vae, folder)
    return folder


def unet_overrides(data: Path, vae: Path, out: Path, **extra) -> list[str]:
    """KEY=VALUE overrides for a tiny stage-"unet" run from scratch."""
    values = {"stage": "unet", "data.path": data, "output": out, "vae_from": vae, "data.resolution": 16,
              "model.unet": TINY_UNET, "model.text_encoder": TINY_TEXT, "batch_size": 4, "lr": 3e-3,
              "lr_warmup_steps": 5, "data.caption_dropout": 0.0, "log_every": 1, "progress": False,
              "checkpoint_every": 0, "defaults.height": 16, "defaults.width": 16, "defaults.steps": 20,
              "defaults.guidance": 1.0, "defaults.sampler": "ddim", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def make_base_model(root: Path) -> tuple[Path, Path, Path]:
    """(data, VAE folder, model folder): a tiny random model to fine-tune or steer, its U-Net moved off its
    zero-initialised output layer so that its outputs differ per input."""
    from ldm.train.build import build_components, write_model
    from ldm.train.config import load_config

    data = make_shapes(root / "data")
    vae = make_vae(root / "vae", data)
    torch.manual_seed(0)
    cfg = load_config(None, unet_overrides(data, vae, root / "unused"))
    components = build_components(cfg)
    with torch.no_grad():
        for p in components.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return data, vae, write_model(components, cfg, root / "base")


def dies_at(trainer, step: int):
    """Make ``trainer`` stop with KeyboardInterrupt when it reaches ``step`` (a run killed there)."""
    train_step = trainer.train_step

    def killed(i):
        if i == step:
            raise KeyboardInterrupt
        return train_step(i)

    trainer.train_step = killed
    return trainer


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (or VAE folder), keyed by relative file and tensor name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out
