"""Load an adapter file onto models: recognise its format by its keys, match every layer, check every shape,
then patch the weights reversibly (``patches``). Nothing is applied unless the whole file fits.

    handle = load_adapter({"unet": unet, "text_encoder": te}, "style.safetensors", scale=0.8)
    handle.set_scale(0.5); handle.remove()

Errors name the file and its first offending keys: keys no table knows, layers this model lacks (an error,
or with ``strict=False`` a warning with their count), and layers whose shapes differ (always an error:
expected vs found).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints.adapters.keys import FileLayer, format_name, group, metadata_alpha
from ldm.checkpoints.adapters.loha import LOHA
from ldm.checkpoints.adapters.lokr import LOKR
from ldm.checkpoints.adapters.lora import LORA
from ldm.checkpoints.adapters.patches import Patch, Patches
from ldm.checkpoints.adapters.targets import LayerIndex
from ldm.checkpoints.tensor_io import (PICKLE_SUFFIXES, CheckpointError, error_list, load_pickle, read_safetensors,
                                       read_safetensors_header)

ADAPTER_TYPES = (LORA, LOHA, LOKR)
KNOWN = "kohya/A1111, LyCORIS (LoCon, LoHa, LoKr), diffusers/PEFT or ldm"


class AdapterHandle:
    """What loading returns: change the scale (per model with ``group``), fuse into the base, or remove."""

    def __init__(self, patches: Patches, owner: int, path: Path, fmt: str, layers: int):
        self.patches, self.owner, self.path, self.format, self.layers = patches, owner, path, fmt, layers

    def set_scale(self, scale: float, group: str | None = None) -> None:
        self.patches.set_scale(self.owner, scale, group)

    def remove(self) -> None:
        """Take this adapter out; the weights are as if it had never been loaded."""
        self.patches.remove(self.owner)

    unload = remove

    def fuse(self) -> None:
        """Keep this adapter's deltas as part of the base weights (removing others no longer undoes it)."""
        self.patches.bake(self.owner)

    def __repr__(self) -> str:
        return f"AdapterHandle({str(self.path)!r}, {self.format}, {self.layers} layers)"


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file or a weights-only pickle (.pt/.ckpt/.bin)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {path} does not exist")
    if path.suffix == ".safetensors":
        read_safetensors_header(path)            # a truncated file fails here, naming itself
        return read_safetensors(path, "adapter file")
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickle(path), {}
    raise CheckpointError(f"{path}: unknown adapter file type {path.suffix!r}; expected .safetensors or one of "
                          f"{PICKLE_SUFFIXES}")


def _kind(layer: FileLayer):
    return next((t for t in ADAPTER_TYPES if t.owns(layer.tensors)), None)


def _alpha(layer: FileLayer, metadata: dict[str, str]) -> float | None:
    if "alpha" in layer.tensors:
        return float(layer.tensors["alpha"])
    return metadata_alpha(metadata, layer)


def plan(models: dict[str, nn.Module], tensors: dict[str, torch.Tensor], metadata: dict[str, str],
         path: Path, strict: bool = True, scales: dict[str, float] | None = None) -> tuple[list[Patch], str]:
    """The patches a file makes (owner 0, to be set), or a CheckpointError saying why it does not fit."""
    layers, unknown = group(tensors)
    if not layers:
        raise CheckpointError(f"{path}: not an adapter file in a format ldm reads ({KNOWN}); its first keys:\n"
                              f"{error_list(sorted(tensors), 8)}")
    fmt = format_name(layers, metadata)
    index = LayerIndex(models)
    patches, missing, mismatched = [], [], []
    for layer in layers:
        kind = _kind(layer)
        extra = sorted(set(layer.tensors) - set(kind.names) - {"alpha"}) if kind else []
        if kind is None or extra:
            unknown += [layer.keys[t] for t in (extra or layer.tensors)]
            continue
        target = index.find(layer.model, layer.name, layer.style)
        if target is None:
            lacks = "" if layer.model in models else f" (this model has no {layer.model})"
            missing.append(f"{layer.first_key}{lacks}")
            continue
        scale = (scales or {}).get(layer.model, 1.0)
        patch = Patch(0, target, kind, dict(layer.tensors), _alpha(layer, metadata), scale, layer.model)
        try:
            raw = kind.delta(patch.tensors, patch.alpha, target.shape)
        except (RuntimeError, ValueError) as exc:
            mismatched.append(f"{layer.first_key}: its factors do not combine ({str(exc).splitlines()[0]})")
            continue
        if patch.delta() is None:
            mismatched.append(f"{layer.first_key}: expected {tuple(target.shape)}, found {tuple(raw.shape)}")
            continue
        patches.append(patch)
    _report(path, fmt, patches, unknown, missing, mismatched, strict)
    return patches, fmt


def _report(path, fmt, patches, unknown, missing, mismatched, strict) -> None:
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} layer(s) with other shapes than this model's (expected vs found; "
                        f"a LoRA for another architecture?):\n{error_list(mismatched, 8)}")
    if missing and (strict or not patches):
        problems.append(f"{len(missing)} layer(s) this model does not have:\n{error_list(missing, 8)}")
    if unknown and (strict or not patches):
        problems.append(f"{len(unknown)} key(s) in no format ldm knows:\n{error_list(unknown, 8)}")
    if problems:
        hint = "" if mismatched or not (missing or unknown) else "\n(strict=False / --no-strict skips them)"
        raise CheckpointError(f"{path} ({fmt} adapter) does not fit this model: " + "\n".join(problems) + hint)
    if missing or unknown:
        warnings.warn(f"{path}: skipped {len(missing)} layer(s) this model lacks and {len(unknown)} unknown "
                      f"key(s) (strict=False)", stacklevel=4)


def load_adapter(models: dict[str, nn.Module], path: str | Path, scale: float = 1.0, strict: bool = True,
                 patches: Patches | None = None, scales: dict[str, float] | None = None) -> AdapterHandle:
    """Apply the adapter file at ``path`` to ``models`` at ``scale`` (times ``scales[model]``, e.g. A1111's
    separate text-encoder and U-Net weights). ``patches``: the registry the adapters of these models share
    (a Pipeline keeps one), so several stack and come off in any order."""
    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    layer_patches, fmt = plan(models, tensors, metadata, path, strict, scales)
    patches = patches if patches is not None else Patches()
    owner = patches.new_owner()
    for p in layer_patches:
        p.owner, p.scale = owner, p.scale * float(scale)
    patches.add(layer_patches)
    return AdapterHandle(patches, owner, path, fmt, len(layer_patches))
