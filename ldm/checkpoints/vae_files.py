"""VAE files on their own, for swapping a model's VAE (``Pipeline.load_vae``): what a file or folder holds is read
from its keys and shapes, as for whole models (``infer``, ``keys``), and loaded strictly.

    vae_file = load_vae_file("vae-ft-mse-840000-ema-pruned.safetensors", scaling_factor=0.18215)
    vae_file = load_vae_file("taesd/")                # or taesd_decoder.pth (+ taesd_encoder.pth beside it)

What is recognised:
  * an SD / SDXL VAE single file (.safetensors, .ckpt, .pt): the original LDM names (``encoder.down.0.block.0...``),
    bare or under ``first_stage_model.`` (so a whole SD checkpoint lends its VAE too), or diffusers' names
    (``encoder.down_blocks.0.resnets.0...``, with a config.json beside it or inferred from the shapes);
  * a diffusers AutoencoderKL or AutoencoderTiny folder (config.json + diffusion_pytorch_model.*), or a pipeline
    folder, whose vae/ is taken;
  * TAESD / TAESDXL (``ldm.models.taesd``): a diffusers AutoencoderTiny folder or single file, or the original
    release's ``taesd_decoder.pth`` / ``taesdxl_decoder.safetensors`` (each half an ``nn.Sequential``), with the
    encoder half beside it when present (without it the VAE decodes only), or ComfyUI's one-file form
    (``taesd_decoder.*`` / ``taesd_encoder.*`` keys). A folder holding only the original halves works too.

Latent scale. A VAE file's tensors do not say by how much the U-Net's latents were scaled (0.18215 for SD, 0.13025
for SDXL: it belongs to the model, not the VAE), so a single file takes the caller's ``scaling_factor`` and
``shift_factor`` (the model's, which is what A1111 does); a diffusers folder has its own in config.json, which wins
(what diffusers does with ``pipe.vae = AutoencoderKL.from_pretrained(folder)``). TAESD works in the U-Net's scale
already (its scaling factor is 1.0).

Anything else (a U-Net, a LoRA, a text encoder) is one CheckpointError naming the file and what it looks like.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints.infer import Hints, infer_vae
from ldm.checkpoints.keys import VAE_PREFIX, KeyMap, gather, vae_keymaps
from ldm.checkpoints.loading import _assign, _config, _module_shapes, _on_meta, _validate, _weight_files
from ldm.checkpoints.tensor_io import (PICKLE_SUFFIXES, CheckpointError, load_tensors, read_json,
                                       read_safetensors_header)
from ldm.models.taesd import AutoencoderTiny, TinyVAEConfig, original_key
from ldm.models.vae import AutoencoderKL, VAEConfig

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
DIFFUSERS_STEM = "diffusion_pytorch_model"
# diffusers < 0.14 named the VAE's mid-block attention differently (its loader still renames them on load)
DEPRECATED_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}
COMFY_TAESD = ("taesd_encoder.", "taesd_decoder.")           # ComfyUI's TAESD module, with vae_scale / vae_shift
COMFY_TAESD_EXTRA = ("vae_scale", "vae_shift")
# Keys that say what a file is when it is not a VAE (for the error), first match wins.
NOT_A_VAE = (
    (("lora_", ".lora.", "lora_A", "lora_B", "hada_", "lokr_", ".alpha"), "a LoRA / LyCORIS adapter"),
    (("control_model.", "input_hint_block.", "controlnet_cond_embedding."), "a ControlNet"),
    (("string_to_param", "emb_params", "clip_l", "clip_g"), "a textual-inversion embedding"),
    (("model.diffusion_model.", "input_blocks.", "time_embedding.", "time_embed."), "a U-Net"),
    (("text_model.", "cond_stage_model.", "conditioner.embedders.", "transformer.resblocks."), "a text encoder"),
)


@dataclass
class VAEFile:
    """A loaded VAE and where it came from: ``name`` and ``hash`` are what A1111 writes as "VAE" and "VAE hash"
    (the file's name; the first 10 hex digits of the sha256 of ``hashed``)."""

    vae: nn.Module                  # ldm.models.AutoencoderKL or ldm.models.taesd.AutoencoderTiny
    kind: str                       # "kl" | "tiny"
    path: Path                      # what the caller named
    files: list[Path] = field(default_factory=list)   # the weight files read
    hash_path: Path | None = None   # what the hash is taken over, where not ``hashed``'s default

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hashed(self) -> Path:
        """What the hash is taken over: the file named (a TAESD pair: its decoder), or the VAE's folder (a
        pipeline folder's vae/; a folder of TAESD halves: its decoder)."""
        if self.hash_path is not None:
            return self.hash_path
        return self.path if self.path.is_dir() or not self.files else self.files[0]


# -- reading ------------------------------------------------------------------------------------------------
def _shapes(path: Path) -> tuple[dict, dict]:
    """(shapes, metadata) of a weight file, reading a safetensors header only."""
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path)
        return dict(header.shapes), dict(header.metadata)
    if path.suffix in PICKLE_SUFFIXES:
        return {k: tuple(v.shape) for k, v in load_tensors(path).items()}, {}
    raise CheckpointError(f"{path}: not a weight file (expected one of {', '.join(WEIGHT_SUFFIXES)})")


def _load(path: Path, dtype) -> dict[str, torch.Tensor]:
    return load_tensors(path, dtype)


def _what_it_is(path: Path, keys) -> str:
    """One line for a file that is not a VAE: what its keys look like."""
    keys = list(keys)
    for markers, what in NOT_A_VAE:
        if any(m in k for k in keys for m in markers):
            return f"{path}: not a VAE: its tensors look like {what} ({len(keys)} tensors, e.g. {keys[0]!r})"
    sample = f", e.g. {keys[0]!r}" if keys else ""
    return (f"{path}: not a VAE ({len(keys)} tensors{sample}); expected an SD/SDXL VAE (encoder.down.0..., "
            "first_stage_model.encoder..., or diffusers' encoder.down_blocks...), a diffusers AutoencoderKL / "
            "AutoencoderTiny folder, or TAESD's taesd_decoder.pth")


def _strict_load(module: nn.Module, path, what: str, shapes: dict, tensors: dict, dtype, maps=None,
                 ignorable=lambda k: False) -> None:
    ours = _module_shapes(module)
    maps = maps or [KeyMap(k, k) for k in ours]
    _validate(path, what, shapes, [(maps, ours)], ignorable)
    state = gather(maps, tensors)
    if any(t.is_meta for t in module.state_dict().values()):
        _assign(module, state, dtype)
    else:
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


# -- AutoencoderKL ------------------------------------------------------------------------------------------
def _is_original_kl(keys) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", VAE_PREFIX + "encoder.down.")) for k in keys)


def _is_diffusers_kl(keys) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)


def _renamed_deprecated(key: str) -> str:
    if ".attentions." in key:
        for old, new in DEPRECATED_ATTENTION.items():
            key = re.sub(rf"\.{re.escape(old)}", "." + new, key)
    return key


def _infer_diffusers_kl(path, shapes: dict) -> dict:
    """An AutoencoderKL config from diffusers-named shapes (no config.json at hand)."""
    def count(template):
        n = 0
        while template.format(n) in shapes:
            n += 1
        return n

    levels = count("encoder.down_blocks.{}.resnets.0.conv1.weight")
    try:
        return {
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)],
            "layers_per_block": count("encoder.down_blocks.0.resnets.{}.conv1.weight"),
            "latent_channels": shapes["decoder.conv_in.weight"][1],
            "use_quant_conv": "quant_conv.weight" in shapes,
            "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        }
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing key {exc.args[0]} (needed to infer the VAE)") from None


def _metadata_config(path, metadata: dict) -> dict | None:
    """The VAE config ldm writes into its own single files' metadata ("ldm.vae"), when there."""
    if "ldm.vae" not in metadata:
        return None
    try:
        return json.loads(metadata["ldm.vae"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt ldm.vae metadata ({exc})") from None


def _kl_single_file(path: Path, shapes: dict, metadata: dict, dtype, scaling_factor, shift_factor,
                    sample_size) -> VAEFile:
    scale = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    if _is_original_kl(shapes):
        prefixed = any(k.startswith(VAE_PREFIX) for k in shapes)
        theirs = (lambda k: k) if prefixed else (lambda k: VAE_PREFIX + k)
        file_shapes = {theirs(k): v for k, v in shapes.items()}
        # a whole SD checkpoint lends its VAE: everything outside first_stage_model. may stay unused; so may the
        # training leftovers of the original autoencoder's files (its loss's discriminator and logvar, EMA counters)
        ignorable = (lambda k: not k.startswith(VAE_PREFIX) or k[len(VAE_PREFIX):].startswith(("loss.", "model_ema.")))
        level = re.compile(re.escape(VAE_PREFIX) + r"encoder\.down\.\d+\.block\.0\.conv1\.weight")
        levels = sum(1 for k in file_shapes if level.fullmatch(k))
        config = _metadata_config(path, metadata) or infer_vae(
            path, file_shapes, {"sample_size": max(1, sample_size // 2 ** max(levels - 1, 0))},
            Hints(scaling_factor=scaling_factor))
        vae = _on_meta(AutoencoderKL, _config(VAEConfig, {**config, **scale}, path, "VAE"))
        maps = vae_keymaps(vae.state_dict(), len(vae.config.block_out_channels))
        tensors = {theirs(k): v for k, v in _load(path, dtype).items()}
        _strict_load(vae, path, "SD VAE its tensors describe", file_shapes, tensors, dtype, maps, ignorable)
        return VAEFile(vae, "kl", path, [path])
    # diffusers names: a config.json beside the file (diffusers' own layout) gives the architecture and scale
    beside = path.parent / "config.json"
    raw = read_json(beside) if beside.is_file() else {}
    shapes = {_renamed_deprecated(k): v for k, v in shapes.items()}
    if raw.get("_class_name") == "AutoencoderKL":
        config = {**raw}
    else:
        config = {**_infer_diffusers_kl(path, shapes), "sample_size": sample_size, **scale}
    vae = _on_meta(AutoencoderKL, _config(VAEConfig, config, beside if raw else path, "VAE"))
    tensors = {_renamed_deprecated(k): v for k, v in _load(path, dtype).items()}
    _strict_load(vae, path, "diffusers AutoencoderKL its tensors describe", shapes, tensors, dtype)
    return VAEFile(vae, "kl", path, [path])


# -- TAESD --------------------------------------------------------------------------------------------------
_INDEXED = re.compile(r"(\d+)\.(.+)")


def _original_half(keys) -> str | None:
    """"encoder" / "decoder" for an original TAESD half (an nn.Sequential's keys: "0.weight", "3.conv.0.weight");
    the encoder starts with a convolution at index 0, the decoder with its clamp (no weights) there."""
    keys = list(keys)
    if not keys or not all(_INDEXED.fullmatch(k) for k in keys):
        return None
    return "encoder" if "0.weight" in keys else "decoder"


def _ours_from_original(half: str, key: str) -> str:
    index, rest = _INDEXED.fullmatch(key).groups()
    offset = 1 if half == "decoder" else 0
    return f"{half}.layers.{int(index) - offset}.{rest}"


def _layer_list(shapes: dict, prefix: str) -> list[tuple[str, tuple]]:
    """The weighted layers of one half in order: ("block", conv.0 shape) or ("conv", weight shape)."""
    indices = sorted({int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)})
    layers = []
    for i in indices:
        if f"{prefix}{i}.conv.0.weight" in shapes:
            layers.append(("block", tuple(shapes[f"{prefix}{i}.conv.0.weight"])))
        elif f"{prefix}{i}.weight" in shapes:
            layers.append(("conv", tuple(shapes[f"{prefix}{i}.weight"])))
    return layers


def _levels(layers, start: int) -> list[tuple[tuple, int]]:
    """(the convolution ending or starting each level, blocks in it) from an alternating layer list."""
    out, blocks = [], 0
    for kind, shape in layers[start:]:
        if kind == "block":
            blocks += 1
        else:
            out.append((shape, blocks))
            blocks = 0
    return out


def infer_tiny(path, shapes: dict, decoder_only: bool = False) -> dict:
    """An AutoencoderTiny config (diffusers' keys) from its (our-named) shapes."""
    dec = _layer_list(shapes, "decoder.layers.")
    if not dec or dec[0][0] != "conv":
        raise CheckpointError(f"{path}: no TAESD decoder layers (decoder.layers.0.weight)")
    # decoder: conv(latent -> c0), then per level: blocks, [upsample], conv; a level's channels are its conv's input
    dec_levels = _levels(dec, 1)
    config = {"latent_channels": dec[0][1][1], "out_channels": dec_levels[-1][0][0],
              "decoder_block_out_channels": [shape[1] for shape, _ in dec_levels],
              "num_decoder_blocks": [n for _, n in dec_levels]}
    if decoder_only:
        n = len(dec_levels)
        config |= {"encoder_block_out_channels": config["decoder_block_out_channels"][::-1],
                   "num_encoder_blocks": [1] + [3] * (n - 1)}
        return config
    enc = _layer_list(shapes, "encoder.layers.")
    if not enc or enc[0][0] != "conv":
        raise CheckpointError(f"{path}: no TAESD encoder layers (encoder.layers.0.weight)")
    # encoder: per level a conv (the first from RGB, then stride 2) and its blocks, then conv(c -> latent)
    convs = [i for i, (kind, _) in enumerate(enc) if kind == "conv"]
    starts = convs[:-1]
    config |= {"in_channels": enc[0][1][1],
               "encoder_block_out_channels": [enc[i][1][0] for i in starts],
               "num_encoder_blocks": [b - a - 1 for a, b in zip(starts, convs[1:])]}
    return config


def _tiny(path: Path, label, shapes: dict, tensors: dict, dtype, config: dict | None = None,
          files: list[Path] | None = None, where=None) -> VAEFile:
    """TAESD from our-named ``shapes``; ``where(key)``: the file key holding our key (default: the same name)."""
    decoder_only = not any(k.startswith("encoder.") for k in shapes)
    config = config if config is not None else infer_tiny(label, shapes, decoder_only)
    vae = AutoencoderTiny(_config(TinyVAEConfig, config, label, "TAESD (AutoencoderTiny)"),
                          with_encoder=not decoder_only)
    where = where or (lambda k: k)
    maps = [KeyMap(k, where(k)) for k in vae.state_dict()]
    file_shapes = {where(k): v for k, v in shapes.items()}
    file_tensors = {where(k): v for k, v in tensors.items()}
    _strict_load(vae, label, "TAESD (AutoencoderTiny) its tensors describe", file_shapes, file_tensors, dtype, maps)
    return VAEFile(vae.requires_grad_(False), "tiny", path, files or [path])


def _partner(path: Path, half: str) -> Path | None:
    """The other half of an original TAESD pair: the same name with encoder <-> decoder, any weight suffix."""
    other = "encoder" if half == "decoder" else "decoder"
    stem = path.stem
    if half not in stem:
        return None
    cut = stem.rfind(half)
    name = stem[:cut] + other + stem[cut + len(half):]
    for suffix in dict.fromkeys((path.suffix, *WEIGHT_SUFFIXES)):
        candidate = path.with_name(name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _original_pair(path: Path, half: str, dtype) -> VAEFile:
    other = _partner(path, half)
    if half == "encoder":
        if other is None:
            raise CheckpointError(f"{path}: a TAESD encoder alone cannot decode; pass its decoder "
                                  f"({path.name.replace('encoder', 'decoder')})")
        path, other, half = other, path, "decoder"
    files = [path] + ([other] if other is not None else [])
    shapes, tensors, names = {}, {}, {}
    for f, h in zip(files, ("decoder", "encoder")):
        file_shapes, _ = _shapes(f)
        if _original_half(file_shapes) != h:
            raise CheckpointError(f"{f}: not a TAESD {h} (an nn.Sequential's tensors: "
                                  f"{'1.weight' if h == 'decoder' else '0.weight'}, ...)")
        shapes |= {_ours_from_original(h, k): v for k, v in file_shapes.items()}
        tensors |= {_ours_from_original(h, k): v for k, v in _load(f, dtype).items()}
        names[h] = f.name

    def where(key):   # errors name the file and its own key: "taesd_encoder.pth: 0.weight"
        half, theirs = original_key(key)
        return f"{names.get(half, half)}: {theirs}"

    label = " + ".join(str(f) if i == 0 else f.name for i, f in enumerate(files))
    return _tiny(path, label, shapes, tensors, dtype, files=files, where=where)


def _comfy_taesd(path: Path, shapes: dict, dtype) -> VAEFile:
    def ours(k):
        half = "encoder" if k.startswith(COMFY_TAESD[0]) else "decoder"
        return _ours_from_original(half, k.split(".", 1)[1])

    keep = [k for k in shapes if k.startswith(COMFY_TAESD)]
    tensors = _load(path, dtype)
    return _tiny(path, path, {ours(k): shapes[k] for k in keep}, {ours(k): tensors[k] for k in keep}, dtype)


# -- folders ------------------------------------------------------------------------------------------------
def _folder(path: Path, dtype, scaling_factor, shift_factor, sample_size) -> VAEFile:
    if (path / "model_index.json").is_file() and (path / "vae").is_dir():
        inner = _folder(path / "vae", dtype, scaling_factor, shift_factor, sample_size)
        inner.hash_path, inner.path = inner.path, path
        return inner
    if (path / "config.json").is_file():
        raw = read_json(path / "config.json")
        files = _weight_files(path, DIFFUSERS_STEM)
        shapes, tensors = {}, {}
        for f in files:
            shapes |= _shapes(f)[0]
            tensors |= _load(f, dtype)
        cls = raw.get("_class_name")
        if cls == "AutoencoderTiny" or (cls is None and "encoder_block_out_channels" in raw):
            return _tiny(path, files[0] if len(files) == 1 else path, shapes, tensors, dtype, raw, files)
        if cls not in (None, "AutoencoderKL"):
            raise CheckpointError(f"{path}: a diffusers {cls}, not a VAE (AutoencoderKL or AutoencoderTiny)")
        shapes = {_renamed_deprecated(k): v for k, v in shapes.items()}
        tensors = {_renamed_deprecated(k): v for k, v in tensors.items()}
        vae = _on_meta(AutoencoderKL, _config(VAEConfig, raw, path / "config.json", "VAE"))
        label = files[0] if len(files) == 1 else path
        _strict_load(vae, label, "config.json", shapes, tensors, dtype)
        return VAEFile(vae, "kl", path, files)
    decoders = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and "decoder" in f.stem)
    if len(decoders) == 1:
        result = _original_pair(decoders[0], "decoder", dtype)
        result.hash_path, result.path = decoders[0], path
        return result
    if decoders:
        raise CheckpointError(f"{path}: several TAESD decoders ({', '.join(f.name for f in decoders)}); "
                              "pass the one for this model (taesd_* for SD 1.x/2.x, taesdxl_* for SDXL)")
    raise CheckpointError(f"{path}: not a VAE folder (no config.json, nor a TAESD *_decoder file)")


# -- public API ---------------------------------------------------------------------------------------------
def load_vae_file(path, *, dtype: torch.dtype | None = None, scaling_factor: float = 0.18215,
                  shift_factor: float | None = None, sample_size: int = 512) -> VAEFile:
    """Load the VAE in ``path`` (see the module docstring) with its floating-point tensors in ``dtype`` (default
    float32). ``scaling_factor`` / ``shift_factor``: the model's latent scale, for files that do not carry one;
    ``sample_size``: the image size the VAE's tiling defaults to."""
    path = Path(path).expanduser()
    dtype = dtype or torch.float32
    if path.is_dir():
        return _folder(path, dtype, scaling_factor, shift_factor, sample_size)
    if not path.is_file():
        raise CheckpointError(f"VAE {path}: no such file or folder")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: not a VAE file (expected {', '.join(WEIGHT_SUFFIXES)} or a folder)")
    shapes, metadata = _shapes(path)
    half = _original_half(shapes)
    if half is not None:
        return _original_pair(path, half, dtype)
    if any(k.startswith(COMFY_TAESD) for k in shapes) and all(
            k.startswith(COMFY_TAESD) or k in COMFY_TAESD_EXTRA for k in shapes):
        return _comfy_taesd(path, shapes, dtype)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in shapes):
        beside = path.parent / "config.json"
        raw = read_json(beside) if beside.is_file() else {}
        config = raw if raw.get("_class_name") == "AutoencoderTiny" else None
        return _tiny(path, path, shapes, _load(path, dtype), dtype, config)
    if _is_original_kl(shapes) or _is_diffusers_kl(shapes):
        return _kl_single_file(path, shapes, metadata, dtype, scaling_factor, shift_factor, sample_size)
    raise CheckpointError(_what_it_is(path, shapes))
