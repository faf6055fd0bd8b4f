"""What the trainer trains: networks built from a config (from scratch) or loaded (fine-tuning), and the
folders it writes at the end (a model folder ``Pipeline.from_pretrained`` loads, or a VAE folder).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ldm import assets
from ldm.checkpoints import Components, load, save_diffusers
from ldm.checkpoints.info import ModelInfo
from ldm.checkpoints.tensor_io import write_json, write_safetensors
from ldm.models.text import TextEncoder, TextEncoderConfig
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, VAEConfig
from ldm.schedules import ScheduleConfig
from ldm.train.config import ConfigError, TrainConfig, suggest

DEFAULT_MODEL_NAME = "default"


def _arch(cls, values: dict, section: str, **fill):
    """``cls.from_dict`` over the preset's mapping, with ``fill`` for keys the preset leaves out."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{section}.{key}'{suggest(key, known)}"
                              f" (keys of {cls.__name__})")
    try:
        return cls.from_dict({**fill, **values})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None


def vae_config(cfg: TrainConfig) -> VAEConfig:
    return _arch(VAEConfig, cfg.model.vae, "model.vae", sample_size=cfg.data.resolution)


def text_config(cfg: TrainConfig) -> TextEncoderConfig:
    return _arch(TextEncoderConfig, cfg.model.text_encoder, "model.text_encoder")


def unet_config(cfg: TrainConfig, vae: VAEConfig, text: TextEncoderConfig) -> UNetConfig:
    return _arch(UNetConfig, cfg.model.unet, "model.unet", sample_size=cfg.data.resolution // vae.downscale,
                 in_channels=vae.latent_channels, out_channels=vae.latent_channels,
                 cross_attention_dim=text.hidden_size)


def schedule_config(cfg: TrainConfig, base: ScheduleConfig | None = None) -> ScheduleConfig:
    """The training noise schedule: ``base`` (an init model's) or the defaults, updated by ``model.schedule``
    and ``prediction_type``."""
    known = [f.name for f in dataclasses.fields(ScheduleConfig)]
    for key in cfg.model.schedule:
        if key not in known:
            raise ConfigError(f"unknown config key 'model.schedule.{key}'{suggest(key, known)}")
    values = {**(base.to_dict() if base is not None else {}), **cfg.model.schedule}
    if cfg.prediction_type is not None:
        values["prediction_type"] = cfg.prediction_type
    try:
        return ScheduleConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.schedule: {e}") from None


def model_path(name: str) -> Path:
    """``"default"`` -> the shipped model's folder; anything else is a path."""
    if name == DEFAULT_MODEL_NAME:
        return assets.DEFAULT_MODEL
    return Path(name)


def load_vae(path: str | Path) -> AutoencoderKL:
    """A VAE from a folder with config.json + weights, or a model folder with a ``vae/`` subfolder."""
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    cfg_file, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(f"vae_from={path}: expected config.json and diffusion_pytorch_model.safetensors in "
                          f"{folder} (the model/ folder written by a stage=vae run)")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    vae = AutoencoderKL(VAEConfig.from_dict(config))
    vae.load_state_dict(load_file(str(weights)), strict=True)
    return vae


def model_info(unet: UNet, vae: AutoencoderKL, text: TextEncoder, schedule: ScheduleConfig, path="") -> ModelInfo:
    """The description of freshly built networks (checkpoints.load makes one from files)."""
    return ModelInfo(path=str(path), format="memory", family=text.config.family, inpainting=False,
                     prediction_type=schedule.prediction_type,
                     resolution=unet.config.sample_size * vae.config.downscale,
                     sample_size=unet.config.sample_size, unet_in_channels=unet.config.in_channels,
                     latent_channels=vae.config.latent_channels, block_out_channels=unet.config.block_out_channels,
                     context_dim=text.hidden_size, text_layers=text.config.num_hidden_layers,
                     text_layer_used=text.config.num_hidden_layers - text.config.skip_layers,
                     text_backend=text.config.backend)


def build_components(cfg: TrainConfig) -> Components:
    """The model to train (``init``: loaded; else, stage "unet", built from ``model.*`` with ``vae_from``)."""
    if cfg.init is not None:
        path = model_path(cfg.init)
        if not path.exists():
            raise ConfigError(f"init={cfg.init}: no such model file or folder ({path})")
        components = load(path)
        components.schedule = schedule_config(cfg, components.schedule)
        return components
    if cfg.vae_from is None:
        raise ConfigError("stage=unet from scratch needs vae_from=PATH (a VAE trained by a stage=vae run) "
                          "or init=MODEL to fine-tune")
    vae = load_vae(cfg.vae_from)
    if vae.config.downscale * (cfg.data.resolution // vae.config.downscale) != cfg.data.resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of the VAE's "
                          f"{vae.config.downscale}x downscale")
    text = TextEncoder(text_config(cfg))
    unet = UNet(unet_config(cfg, vae.config, text.config))
    schedule = schedule_config(cfg)
    return Components(unet, vae, text, schedule, model_info(unet, vae, text, schedule))


def generation_defaults(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg.defaults)


def write_model(components: Components, cfg: TrainConfig, folder: Path) -> Path:
    """The final model folder (diffusers layout + ``ldm.json`` with suggested generation settings)."""
    components.defaults = generation_defaults(cfg)
    save_diffusers(components, folder)
    return folder


def write_vae(vae: AutoencoderKL, folder: Path) -> Path:
    """``folder/vae/`` in the diffusers layout; stage "unet" reads it back through ``vae_from``."""
    # weights first: a folder with config.json is whole (each file is itself written atomically)
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", vae.state_dict())
    write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae.config.to_dict()})
    return folder / "vae"


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (Rombach et al. 2022, §G:
    SD's 0.18215 was measured the same way)."""
    z = vae.encode(pixels).mode()
    return float(1.0 / z.float().std().clamp(min=1e-6))
