"""The trainer's typed configuration: dataclasses, YAML presets and ``KEY=VALUE`` overrides.

A preset (``configs/*.yaml``) holds values only; an optional ``stages`` mapping holds per-stage values
(``stages: {vae: {lr: 5e-4}, unet: {lr: 1e-3}}``) applied over the shared ones for the chosen ``stage``. Keys are dotted paths into :class:`TrainConfig`
(``data.resolution=64``, ``lora.rank=8``); an unknown key is an error that names it and suggests the
nearest known key. Architecture sections (``model.unet``, ``model.vae``, ``model.text_encoder``,
``model.schedule``) are plain mappings handed to the model configs, which validate their own keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


STAGES = ("vae", "unet", "controlnet")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and value at fault."""


@dataclass
class DataConfig:
    path: str | None = None              # image folder (sidecar .txt, metadata.jsonl or metadata.csv)
    resolution: int = 64                 # training size (square unless buckets are on)
    crop: str = "center"                 # "center" | "random"
    buckets: bool = False                # aspect-ratio buckets of about resolution² pixels
    bucket_step: int = 64                # bucket sides are multiples of this
    max_aspect: float = 2.0              # widest bucket ratio
    flip: bool = False                   # random horizontal flip (opt-in: it mirrors text and asymmetric things)
    caption_dropout: float = 0.1         # share of captions replaced by "" (teaches the unconditional branch)
    augment: bool = False                # identity-preserving small shifts/scales with a solid fill
    augment_shift: float = 0.08          # largest shift, as a fraction of the side
    augment_scale: float = 0.15          # scale drawn from [1 - augment_scale, 1]
    augment_fill: tuple[int, int, int] = (255, 255, 255)
    augment_variants: int = 8            # augmented copies kept in the latent cache per image
    cache_latents: bool = True           # encode once with the frozen VAE and keep the latents on disk
    cache_dir: str | None = None         # default: OUTPUT/cache
    strict: bool = False                 # fail on the first unreadable image instead of skipping it
    repeats: dict[str, int] = field(default_factory=dict)  # {"kind=single": 2}: records whose metadata field
                                                          # has that value are drawn this many times per epoch


@dataclass
class LoRAConfig:
    rank: int = 0                        # 0 = no LoRA (full fine-tune or training from scratch)
    alpha: float | None = None           # scale = alpha / rank; None -> alpha = rank
    text_encoder: bool = False           # also adapt the text encoder's q/k/v/out projections
    format: str = "ldm"                  # lora.safetensors layout: "ldm" (PEFT names) | "kohya" (A1111/ComfyUI)


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0               # |x - x̂|: sharp edges without a perceptual net
    l2_weight: float = 1.0
    kl_weight: float = 1e-6              # KL(q(z|x) || N(0, I)), kept small as in Rombach et al. 2022
    chroma_weight: float = 0.0           # L1 + L2 of the error's colour part, its grey part removed (docs/training.md)


@dataclass
class ControlNetTrainConfig:
    """stage=controlnet: a ControlNet trained beside the frozen init model (docs/training.md, "ControlNet")."""
    init: str | None = None              # a ControlNet to continue (what load_control reads); None: a copy of
                                         # the U-Net's encoder with zero convs (diffusers' ControlNetModel.from_unet)
    hint_channels: list[int] = field(default_factory=list)  # the hint embedding's widths, one halving between
                                         # two; []: diffusers' (16, 32, 96, 256) cut to the VAE's downscale
    column: str = "conditioning_image"   # metadata.jsonl/csv field naming each image's control image (diffusers'
                                         # train_controlnet.py column); data without it: canny of the image
    canny_low: int = 100                 # thresholds of that canny (ldm.pipeline.preprocess.canny)
    canny_high: int = 200
    validation_scale: float = 1.0        # the control's weight in the validation grids


@dataclass
class ModelConfig:
    unet: dict[str, Any] = field(default_factory=dict)          # ldm.models.unet.UNetConfig keys
    vae: dict[str, Any] = field(default_factory=dict)           # ldm.models.vae.VAEConfig keys
    text_encoder: dict[str, Any] = field(default_factory=dict)  # transformers CLIPTextConfig keys
    schedule: dict[str, Any] = field(default_factory=dict)      # ldm.schedules.ScheduleConfig keys


@dataclass
class ValidationConfig:
    every: int = 0                       # steps between validation grids; 0 = never
    prompts: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class DefaultsConfig:
    """Suggested generation settings written to the model folder's ``ldm.json``."""
    steps: int = 25
    guidance: float = 5.0
    sampler: str = "dpmpp_2m"
    height: int = 64
    width: int = 64


@dataclass
class TrainConfig:
    stage: str = "unet"                  # "vae" (autoencoder from scratch) | "unet" (U-Net, text encoder) |
                                         # "controlnet" (a ControlNet for init=MODEL, the model frozen)
    output: str | None = None
    init: str | None = None              # model to fine-tune; None = from scratch
    vae_from: str | None = None          # a trained VAE (model folder or its vae/ subfolder) for stage "unet"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 8                  # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None -> lr
    lr_warmup_steps: int = 0
    lr_schedule: str = "cosine"          # "cosine" | "constant"
    lr_min_ratio: float = 0.0            # cosine decays to lr * lr_min_ratio
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0           # 0 = no clipping
    mixed_precision: str = "no"          # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False                # torch.compile the training forward (U-Net or VAE); validation and
                                         # export use the plain modules
    ema_decay: float = 0.0               # 0 = no EMA
    ema_warmup: bool = True              # decay ramps as (1 + n) / (10 + n) up to ema_decay
    train_text_encoder: bool = True
    train_vae_encoder: bool = True       # stage "vae": false fine-tunes the decoder only (needs init=MODEL): the
                                         # latents, their scale and so the model's U-Net stay valid
    prediction_type: str | None = None   # "epsilon" | "v_prediction"; None: the init model's, else epsilon
    snr_gamma: float | None = None       # min-SNR-γ loss weighting (Hang et al. 2023); None = off
    offset_noise: float = 0.0            # Guttenberg 2023; 0.05-0.1 typical
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)

    def validate(self) -> "TrainConfig":
        """Check values that types alone cannot; return self."""
        choices = {
            "stage": STAGES,
            "lr_schedule": ("cosine", "constant"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "prediction_type": (None, "epsilon", "v_prediction"),
            "data.crop": ("center", "random"),
        }
        for key, allowed in choices.items():
            value = get_key(self, key)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
        positive = ("max_steps", "batch_size", "grad_accum", "data.resolution", "data.augment_variants")
        for key in positive:
            if get_key(self, key) < 1:
                raise ConfigError(f"{key}={get_key(self, key)} must be at least 1")
        if not 0.0 <= self.data.caption_dropout <= 1.0:
            raise ConfigError(f"data.caption_dropout={self.data.caption_dropout} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.lora.format not in ("ldm", "kohya"):
            raise ConfigError(f"lora.format={self.lora.format!r}: expected ldm or kohya")
        if self.lora.rank < 0:
            raise ConfigError(f"lora.rank={self.lora.rank} must be >= 0")
        if self.lora.rank and self.init is None:
            raise ConfigError("lora.rank > 0 needs init=MODEL: a LoRA adapts an existing model")
        if self.stage == "vae" and self.lora.rank:
            raise ConfigError("stage=vae does not support LoRA")
        if self.stage == "controlnet" and self.init is None:
            raise ConfigError("stage=controlnet needs init=MODEL: a ControlNet steers an existing model")
        if self.stage == "controlnet" and self.lora.rank:
            raise ConfigError("stage=controlnet does not support LoRA (it trains the whole ControlNet)")
        if self.stage == "controlnet" and not 0 <= self.controlnet.canny_low <= self.controlnet.canny_high:
            raise ConfigError(f"controlnet.canny_low={self.controlnet.canny_low} must be in [0, canny_high="
                              f"{self.controlnet.canny_high}]")
        if self.stage == "vae" and not self.train_vae_encoder and self.init is None:
            raise ConfigError("train_vae_encoder=false fine-tunes a trained VAE's decoder: it needs init=MODEL")
        return self

    @property
    def lora_scale(self) -> float:
        return (self.lora.alpha if self.lora.alpha is not None else self.lora.rank) / max(self.lora.rank, 1)


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + f.name + "."))
    return keys


def suggest(key: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the nearest known key, or ''."""
    short = {k.rsplit(".", 1)[-1]: k for k in known}
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not match:
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(short), n=1, cutoff=0.6)
        match = [short[leaf[0]]] if leaf else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the field type ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    bad = ConfigError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads "1e-4" as a string
                try:
                    return float(value)
                except ValueError:
                    raise bad from None
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise bad


def from_dict(cls, data: dict, prefix: str = "", *, known: list[str] | None = None):
    """Build dataclass ``cls`` from a nested mapping; unknown keys -> ConfigError with a suggestion."""
    known = known if known is not None else _all_keys(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise ConfigError(f"unknown config key '{key}'{suggest(key, known)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key + ".", known=known)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def get_key(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_nested(data: dict, dotted: str, value: Any, known: list[str]) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: i + 1])
        # inside an architecture mapping (model.unet.*), any key is allowed; the model config validates it
        if prefix not in known and not prefix.startswith("model."):
            raise ConfigError(f"unknown config key '{dotted}'{suggest(dotted, known)}")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{prefix}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1e-4"`` -> ``("a.b", 1e-4)``; the value is read as YAML (numbers, lists, true/false, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> TrainConfig:
    """Preset file (optional) + ``KEY=VALUE`` overrides + already-typed ``values`` (from CLI flags).

    Later sources win: file < overrides < values. Raises ConfigError for unknown keys (with the nearest
    known key), wrong types, and unreadable files.
    """
    data: dict = {}
    where = f" in {path}" if path is not None else ""
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    known = _all_keys(TrainConfig)
    stages = data.pop("stages", None) or {}
    pairs = [parse_override(item) for item in overrides]
    pairs += [(k, v) for k, v in (values or {}).items() if v is not None]
    stage = next((v for k, v in reversed(pairs) if k == "stage"), data.get("stage", TrainConfig.stage))
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ConfigError(f"'stages' must map stage names to mappings of keys{where}")
    try:
        for name, section in stages.items():   # check every section, not only the one used now
            if name not in STAGES:
                raise ConfigError(f"unknown stage '{name}' under 'stages' (stages: {', '.join(STAGES)})")
            from_dict(TrainConfig, _merge(data, section), f"stages.{name}.", known=known)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None
    data = _merge(data, stages.get(stage, {}))
    for key, value in pairs:
        _set_nested(data, key, value, known)
    try:
        cfg = from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None
    return cfg.validate()


def _merge(base: dict, update: dict) -> dict:
    """Nested dict merge: ``update`` wins, sub-mappings merge key by key (except architecture mappings,
    which ``update`` replaces whole, so a stage can state its own U-Net)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("unet", "vae", "text_encoder"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
