"""Loading SD-family models: SD single files (.safetensors, .ckpt) and diffusers pipeline folders.

    components = load("v1-5-pruned-emaonly.safetensors")       # or a diffusers / ldm folder
    print(describe("model.safetensors"))                        # what `ldm info` prints

Loading is strict: every tensor the model needs must be present with the right shape, and every tensor in the
file must be used (a few known-unused ones aside: LatentDiffusion's schedule buffers, CLIP's position_ids,
OpenCLIP's logit_scale, and the EMA copies when they are not used). Anything else is one CheckpointError that
names the file and lists the offending keys. Pickled files are read only with torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoints.components import Components
from ldm.checkpoints.infer import Hints, SingleFileLayout, analyse, sidecar_hints
from ldm.checkpoints.info import FAMILY_NAMES, ModelInfo
from ldm.checkpoints.keys import (EMA_BOOKKEEPING, EMA_PREFIX, SDXL_PREFIX, UNET_PREFIX, VAE_PREFIX, KeyMap, check,
                                  ema_key, gather, text_keymaps, unet_keymaps, vae_keymaps)
from ldm.checkpoints.tensor_io import (PICKLE_SUFFIXES, CheckpointError, cast_floating, error_list, load_tensors,
                                       read_json, read_safetensors_header)
from ldm.models.text import TextEncoder, TextEncoderConfig
from ldm.models.tokenizer import load_tokenizer
from ldm.models.unet import UNet, UNetConfig
from ldm.models.taesd import AutoencoderTiny, TinyVAEConfig
from ldm.models.vae import AutoencoderKL, VAEConfig
from ldm.schedules import ScheduleConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUBFOLDERS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
              "text_encoder_2": "model"}
TEXT_SLOTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}   # diffusers subfolders
DEFAULTS_FILE = "ldm.json"        # optional suggested steps / guidance / sampler / size of a folder's model
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# -- strict matching ----------------------------------------------------------------------------------------
def _module_shapes(module_or_weights) -> dict[str, tuple]:
    items = module_or_weights.items() if isinstance(module_or_weights, dict) else \
        module_or_weights.state_dict().items()
    return {k: tuple(v.shape) for k, v in items}


def _validate(path, what: str, file_shapes: dict, groups, ignorable) -> None:
    """Raise one CheckpointError listing missing, mis-shaped and unexpected keys across ``groups``
    (pairs of key maps and our shapes); ``ignorable(key)`` marks file keys that may go unused."""
    missing, misshaped, consumed = [], [], set()
    for maps, ours in groups:
        m, s = check(maps, file_shapes, ours)
        missing += m
        misshaped += s
        consumed |= {km.theirs for km in maps}
    unexpected = sorted(k for k in file_shapes if k not in consumed and not ignorable(k))
    if missing or misshaped or unexpected:
        parts = [f"{path}: the weights do not match the {what}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                parts.append(f"  {len(items)} {title} key(s):\n{error_list(items)}")
        raise CheckpointError("\n".join(parts))


def _config(cls, values: dict, path, what: str):
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unsupported {what} configuration: {exc}") from None


def _on_meta(cls, config):
    """Build a module without allocating or initialising its weights (they are assigned from the file)."""
    with torch.device("meta"):
        return cls(config)


def _assign(module, state: dict, dtype) -> None:
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def _assign_text(text: TextEncoder, state: dict, dtype) -> None:
    text.load_weights({k: v.to(dtype) for k, v in state.items()}, assign=True)


def _schedule(values: dict, prediction_type: str | None, path) -> ScheduleConfig:
    if prediction_type:
        values = {**values, "prediction_type": prediction_type}
    try:
        return ScheduleConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unsupported noise schedule: {exc}") from None


def _check_prediction(prediction_type):
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def _finish(components: Components, device, dtype, vae_dtype) -> Components:
    for module in components.modules:
        module.to(device=device or "cpu", dtype=vae_dtype if module is components.vae else dtype).eval()
    return components


# -- SD single files ----------------------------------------------------------------------------------------
def _unet_maps(unet: UNet, layout: SingleFileLayout, use_ema: bool) -> list[KeyMap]:
    cfg = unet.config
    maps = unet_keymaps(unet.state_dict(), list(cfg.per_level("layers_per_block")),
                        [t == "CrossAttnUpBlock2D" for t in cfg.up_block_types])
    if use_ema and layout.ema:
        maps = [dataclasses.replace(m, theirs=ema_key(m.theirs)) for m in maps]
    return maps


def _ignorable_sd_key(key: str, ema_used: bool) -> bool:
    if "." not in key or key == "denoiser.sigmas":   # LatentDiffusion's schedule buffers (betas, ...); sgm's sigmas
        return True
    text = key.startswith(("cond_stage_model.", SDXL_PREFIX))
    if key.endswith(".position_ids") or (text and key.endswith((".logit_scale", ".attn_mask"))) \
            or key in EMA_BOOKKEEPING:
        return True
    if key.startswith(EMA_PREFIX):
        return not ema_used
    return ema_used and key.startswith(UNET_PREFIX)       # raw U-Net weights replaced by their EMA copies


def _read_single_file(path: Path, *, tensors: bool, dtype=None):
    """(tensors or None, shapes, dtype names, metadata) of an SD single file; floating-point tensors in
    ``dtype`` when given (dtype names: the file's)."""
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path)
        loaded = load_tensors(path, dtype) if tensors else None
        dtypes = {k: _DTYPE_NAMES.get(v, v.lower()) for k, v in header.dtypes.items()}
        return loaded, header.shapes, dtypes, header.metadata
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, .ckpt, or a diffusers folder)")
    loaded = load_tensors(path)
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in loaded.items()}
    return cast_floating(loaded, dtype), {k: tuple(v.shape) for k, v in loaded.items()}, dtypes, {}


def _layout(path: Path, shapes: dict, metadata: dict, prediction_type):
    hints: Hints = sidecar_hints(path)
    if prediction_type:
        hints.prediction_type = prediction_type
    layout = analyse(path, shapes, metadata, hints)
    return layout, _schedule(layout.schedule, None, path)


def _load_single_file(path: Path, prediction_type, use_ema: bool, dtype, vae_dtype) -> Components:
    # Each tensor is read straight into its network's dtype: the VAE's keys into vae_dtype, the rest into dtype.
    read_as = dtype if vae_dtype == dtype else (lambda key: vae_dtype if key.startswith(VAE_PREFIX) else dtype)
    tensors, shapes, dtypes, metadata = _read_single_file(path, tensors=True, dtype=read_as)
    layout, schedule = _layout(path, shapes, metadata, prediction_type)
    unet = _on_meta(UNet, _config(UNetConfig, layout.unet, path, "U-Net"))
    vae = _on_meta(AutoencoderKL, _config(VAEConfig, layout.vae, path, "VAE"))
    texts = [TextEncoder(slot.config, init_weights=False) for slot in layout.texts]
    text_weights = [text.weights() for text in texts]
    ema_used = use_ema and layout.ema
    maps = [_unet_maps(unet, layout, use_ema), vae_keymaps(vae.state_dict(), len(vae.config.block_out_channels)),
            *(text_keymaps(w, slot.layout, slot.config.backend, slot.prefix, shapes)
              for w, slot in zip(text_weights, layout.texts))]
    ours = [_module_shapes(unet), _module_shapes(vae), *(_module_shapes(w) for w in text_weights)]
    _validate(path, f"{FAMILY_NAMES[layout.family].split(' (')[0]} model its tensors describe", shapes,
              list(zip(maps, ours)), lambda k: _ignorable_sd_key(k, ema_used))
    # The tensors arrive in their network's dtype (converted one by one as read); one component at a time,
    # dropping the file's tensors once taken.
    for i, module in enumerate([unet, vae, *texts]):
        state = gather(maps[i], tensors)
        for m in maps[i]:
            tensors.pop(m.theirs, None)
        (_assign_text if i >= 2 else _assign)(module, state, vae_dtype if module is vae else dtype)
        del state
    info = _single_file_info(path, layout, schedule, shapes, dtypes)
    return Components(unet, vae, texts[0], schedule, info, layout.defaults,
                      text_encoder_2=texts[1] if len(texts) > 1 else None, pipeline_config=layout.pipeline)


def _numel(shapes: dict, keep) -> int:
    return sum(math.prod(shape) for key, shape in shapes.items() if keep(key))


def _common_dtype(dtypes: dict, keys) -> str:
    counts = Counter(dtypes[k] for k in keys)
    return counts.most_common(1)[0][0] if counts else "unknown"


def _info(path, fmt, unet: dict, vae: dict, texts: list[TextEncoderConfig], schedule, family: str | None = None,
          **extra) -> ModelInfo:
    """``texts``: the text encoders' configs in prompt order (the first one describes the text encoder row)."""
    text = texts[0]
    downscale = 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelInfo(
        path=str(path), format=fmt, family=family or text.family, inpainting=unet.get("in_channels", 4) == 9,
        prediction_type=schedule.prediction_type, resolution=unet.get("sample_size", 64) * downscale,
        sample_size=unet.get("sample_size", 64), unet_in_channels=unet.get("in_channels", 4),
        latent_channels=vae.get("latent_channels", 4), block_out_channels=tuple(unet["block_out_channels"]),
        context_dim=sum(t.hidden_size for t in texts), text_layers=text.num_hidden_layers,
        text_layer_used=text.num_hidden_layers - text.skip_layers, text_backend=text.backend,
        text_2=(texts[1].backend, texts[1].num_hidden_layers, texts[1].num_hidden_layers - texts[1].skip_layers)
        if len(texts) > 1 else None, **extra)


def _single_file_info(path: Path, layout: SingleFileLayout, schedule, shapes, dtypes) -> ModelInfo:
    def text_key(prefix):
        return lambda k: k.startswith(prefix) and not k.endswith(("position_ids", "logit_scale", "attn_mask"))

    unet_keys = [k for k in shapes if k.startswith(UNET_PREFIX)]
    names = ("text_encoder", "text_encoder_2")
    return _info(path, "safetensors" if path.suffix == ".safetensors" else "ckpt", layout.unet, layout.vae,
                 [slot.config for slot in layout.texts], schedule, family=layout.family,
                 parameters={"unet": _numel(shapes, lambda k: k.startswith(UNET_PREFIX)),
                             "vae": _numel(shapes, lambda k: k.startswith(VAE_PREFIX)),
                             **{name: _numel(shapes, text_key(slot.prefix))
                                for name, slot in zip(names, layout.texts)}},
                 dtype=_common_dtype(dtypes, unet_keys), ema=layout.ema, file_size=path.stat().st_size)


# -- diffusers folders ----------------------------------------------------------------------------------------
def _weight_files(sub: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one pipeline component: safetensors before .bin, full precision before the
    fp16 variant (``variant="fp16"``: the variant first, as diffusers' ``variant=`` asks), a single file or the
    shards an ``*.index.json`` lists."""
    for variant in ((f".{variant}", "") if variant else ("", ".fp16")):
        for ext in (".safetensors", ".bin"):
            single = sub / f"{stem}{variant}{ext}"
            if single.is_file():
                return [single]
            index = sub / f"{stem}{variant}{ext}.index.json"
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index}: no weight_map")
                return [sub / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{sub}: no weights ({stem}.safetensors or {stem}.bin, or their fp16 variants)")


@dataclass
class _Weights:
    """One pipeline component's weight files, and their tensors (when loaded) or just shapes and dtypes."""

    files: list[Path]
    shapes: dict
    dtypes: dict
    tensors: dict | None = None

    @classmethod
    def read(cls, sub: Path, stem: str, load_tensors_too: bool, dtype=None, variant=None) -> _Weights:
        files = _weight_files(sub, stem, variant)
        shapes, dtypes, tensors = {}, {}, {} if load_tensors_too else None
        text = sub.name in TEXT_SLOTS          # transformers < 5 saves under "text_model."; 5.x does not
        for f in files:
            if f.suffix == ".safetensors":
                header = read_safetensors_header(f)
                file_shapes = header.shapes
                file_dtypes = {k: _DTYPE_NAMES.get(v, v.lower()) for k, v in header.dtypes.items()}
                loaded = load_tensors(f, dtype) if load_tensors_too else {}
            else:
                loaded = load_tensors(f)
                file_shapes = {k: tuple(v.shape) for k, v in loaded.items()}
                file_dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in loaded.items()}
                loaded = cast_floating(loaded, dtype)
            strip = (lambda k: k.removeprefix("text_model.")) if text else (lambda k: k)
            shapes.update({strip(k): v for k, v in file_shapes.items()})
            dtypes.update({strip(k): v for k, v in file_dtypes.items()})
            if tensors is not None:
                tensors.update({strip(k): v for k, v in loaded.items()})
        return cls(files, shapes, dtypes, tensors)

    @property
    def label(self) -> Path:
        return self.files[0] if len(self.files) == 1 else self.files[0].parent


@dataclass
class _FolderConfigs:
    unet: dict
    vae: dict
    texts: dict[str, TextEncoderConfig]       # diffusers subfolder -> config, in prompt order
    schedule: ScheduleConfig
    defaults: dict
    pipeline: dict                            # model_index.json flags (force_zeros_for_empty_prompt, ...)
    family: str


def _text_slots(folder: Path, index: dict) -> list[str]:
    """The text encoder subfolders a pipeline folder uses: model_index.json names them ([null, null] or no
    entry: none), and each must have its config."""
    slots = [name for name in TEXT_SLOTS if isinstance(index.get(name), list) and index[name][0] is not None]
    if not slots:
        raise CheckpointError(f"{folder}: model_index.json names no text encoder (text_encoder / text_encoder_2)")
    return slots


def _sdxl_text(config: TextEncoderConfig, raw: dict) -> TextEncoderConfig:
    """SDXL reads each encoder's penultimate layer without the final norm; bigG also gives its projection."""
    projection = any("WithProjection" in a for a in raw.get("architectures") or [])
    return dataclasses.replace(config, skip_layers=1, final_norm=False, with_projection=projection)


def _folder_configs(folder: Path, prediction_type) -> _FolderConfigs:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json(folder / "model_index.json")
    slots = _text_slots(folder, index)
    for name in ("unet", "vae", *slots):
        if not (folder / name / "config.json").is_file():
            raise CheckpointError(f"{folder}: pipeline folder without {name}/config.json")
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    sdxl = unet.get("addition_embed_type") == "text_time"
    texts = {}
    for name in slots:
        raw = read_json(folder / name / "config.json")
        config = _config(TextEncoderConfig, raw, folder / name / "config.json", "text encoder")
        texts[name] = _sdxl_text(config, raw) if sdxl else config
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    schedule = _schedule(read_json(scheduler_file) if scheduler_file.is_file() else {}, prediction_type,
                         scheduler_file)
    defaults = read_json(folder / DEFAULTS_FILE) if (folder / DEFAULTS_FILE).is_file() else {}
    flags = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}
    family = ("sdxl" if "text_encoder" in texts else "sdxl_refiner") if sdxl else texts[slots[0]].family
    return _FolderConfigs(unet, vae, texts, schedule, defaults, flags, family)


def _folder(folder: Path, prediction_type, load_tensors_too: bool, dtype=None, vae_dtype=None, variant=None):
    """(configs, per-component weights, ModelInfo) of a diffusers folder; loaded floating-point tensors in
    ``dtype`` when given (the VAE's in ``vae_dtype``)."""
    c = _folder_configs(folder, prediction_type)
    names = ("unet", "vae", *c.texts)
    weights = {name: _Weights.read(folder / name, SUBFOLDERS[name], load_tensors_too,
                                   vae_dtype if name == "vae" else dtype, variant) for name in names}
    parameters = {name: _numel(w.shapes, lambda k: not k.endswith("position_ids")) for name, w in weights.items()}
    info = _info(folder, "diffusers", c.unet, c.vae, list(c.texts.values()), c.schedule, family=c.family,
                 parameters=parameters, dtype=_common_dtype(weights["unet"].dtypes, weights["unet"].dtypes),
                 file_size=sum(f.stat().st_size for w in weights.values() for f in w.files))
    return c, weights, info


def _folder_tokenizer(folder: Path, name: str):
    if not (folder / name).is_dir():
        return None
    try:
        return load_tokenizer(folder / name)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / name}: unreadable tokenizer ({exc})") from None


def _load_folder(folder: Path, prediction_type, dtype, vae_dtype, variant=None) -> Components:
    c, weights, info = _folder(folder, prediction_type, True, dtype, vae_dtype, variant)
    unet = _on_meta(UNet, _config(UNetConfig, c.unet, folder / "unet" / "config.json", "U-Net"))
    # a folder saved with a TAESD swapped in (Pipeline.load_vae) holds a diffusers AutoencoderTiny as its VAE
    vae_classes = (AutoencoderTiny, TinyVAEConfig) if c.vae.get("_class_name") == "AutoencoderTiny" else \
        (AutoencoderKL, VAEConfig)
    vae = _on_meta(vae_classes[0], _config(vae_classes[1], c.vae, folder / "vae" / "config.json", "VAE"))
    texts = {name: TextEncoder(cfg, tokenizer=_folder_tokenizer(folder, TEXT_SLOTS[name]), init_weights=False)
             for name, cfg in c.texts.items()}
    ours = {"unet": _module_shapes(unet), "vae": _module_shapes(vae),
            **{name: _module_shapes(text.weights()) for name, text in texts.items()}}
    for name, shapes in ours.items():
        _validate(weights[name].label, f"{name}/config.json", weights[name].shapes,
                  [([KeyMap(k, k) for k in shapes], shapes)], lambda k: k.endswith("position_ids"))
    _assign(unet, weights["unet"].tensors, dtype)
    _assign(vae, weights["vae"].tensors, vae_dtype)
    for name, text in texts.items():
        _assign_text(text, {k: v for k, v in weights[name].tensors.items() if not k.endswith("position_ids")}, dtype)
    encoders = list(texts.values())
    return Components(unet, vae, encoders[0], c.schedule, info, c.defaults,
                      text_encoder_2=encoders[1] if len(encoders) > 1 else None, pipeline_config=c.pipeline)


# -- public API ---------------------------------------------------------------------------------------------
def load(path, *, device=None, dtype=None, vae_dtype=None, prediction_type=None,
         use_ema: bool = True, variant: str | None = None) -> Components:
    """Load an SD single file (.safetensors / .ckpt), a diffusers pipeline folder or a folder saved by ldm.

    dtype: of the loaded networks (default float32); vae_dtype: the VAE's (default: dtype); each tensor is read
    straight into its component's dtype, so a model loaded in another dtype never holds a float32 copy beside
    it (the VAE's float32 weights, when vae_dtype is float32, come from the file, not from a rounded copy).
    device: where they go (default CPU).
    prediction_type: "epsilon" | "v_prediction" | "sample"; overrides the file's (single files cannot tell
    from their shapes: without this argument, a sidecar ``<name>.yaml`` with ``parameterization: "v"``, or
    ldm's own metadata, they are taken as epsilon). use_ema: use the EMA U-Net weights when the file has them.
    variant: a diffusers folder's weight variant ("fp16": ``diffusion_pytorch_model.fp16.safetensors``).
    """
    _check_prediction(prediction_type)
    path = Path(path).expanduser()
    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    if path.is_dir():
        components = _load_folder(path, prediction_type, dtype, vae_dtype, variant)
    elif path.is_file():
        components = _load_single_file(path, prediction_type, use_ema, dtype, vae_dtype)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return _finish(components, device, dtype, vae_dtype)


def describe(path, *, prediction_type=None) -> ModelInfo:
    """What a checkpoint holds, read from headers and configs without building the networks."""
    _check_prediction(prediction_type)
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder(path, prediction_type, False)[2]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    _, shapes, dtypes, metadata = _read_single_file(path, tensors=path.suffix != ".safetensors")
    layout, schedule = _layout(path, shapes, metadata, prediction_type)
    return _single_file_info(path, layout, schedule, shapes, dtypes)
