"""How adapter files name layers: the community key conventions as tables of data.

    kohya / A1111 / LyCORIS   lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (.alpha, .hada_w1_a, ...)
                              lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight
    diffusers / PEFT / ldm    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight            (lora_B, .alpha)
    diffusers < 0.21          unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight

A key is (prefix row) + layer name + "." + tensor name. Kohya writes the module path with its dots as
underscores (which only the model's own module list can undo, see ``targets``); the dotted formats write it
as is. Tensor names are renamed to kohya's (``lora_A`` -> ``lora_down``), which the adapter types read.
SDXL rows are here already: ``lora_te1_`` is SDXL's CLIP-L (the SD 1 encoder's shapes), ``lora_te2_`` and
``text_encoder_2.`` its OpenCLIP bigG, which a pipeline offers as the model ``text_encoder_2``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ldm.checkpoints.adapters.loha import NAMES as LOHA_NAMES
from ldm.checkpoints.adapters.lokr import NAMES as LOKR_NAMES


@dataclass(frozen=True)
class Prefix:
    """One row: keys that begin with ``text`` adapt the model ``model``, naming layers in ``style``."""

    text: str
    model: str
    style: str          # "kohya": module path with "_" for "."; "dotted": the module path itself


PREFIXES = (
    Prefix("lora_unet_", "unet", "kohya"),
    Prefix("lora_te_", "text_encoder", "kohya"),
    Prefix("lora_te1_", "text_encoder", "kohya"),           # SDXL: CLIP ViT-L
    Prefix("lora_te2_", "text_encoder_2", "kohya"),         # SDXL: OpenCLIP ViT-bigG
    Prefix("unet.", "unet", "dotted"),
    Prefix("text_encoder.", "text_encoder", "dotted"),
    Prefix("text_encoder_2.", "text_encoder_2", "dotted"),
)

# Tensor names the adapter types read (kohya's spelling), then the dotted formats' spellings of them.
KOHYA_TENSORS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", *LOHA_NAMES, *LOKR_NAMES)
DOTTED_SUFFIXES = (
    ("_lora.down.weight", "lora_down.weight"),                # diffusers' old attention processors
    ("_lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),   # diffusers' old text-encoder MLP LoRA
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_A.weight", "lora_down.weight"),                   # PEFT
    (".lora_B.weight", "lora_up.weight"),
    *((f".{name}", name) for name in KOHYA_TENSORS),
)


@dataclass
class FileLayer:
    """The tensors a file holds for one layer, under kohya's tensor names."""

    model: str
    name: str
    style: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)      # tensor name -> the file's key

    @property
    def first_key(self) -> str:
        return next((k for t, k in self.keys.items() if t != "alpha"), next(iter(self.keys.values())))


def _split(key: str) -> tuple[Prefix, str, str] | None:
    """key -> (prefix row, layer name, kohya tensor name), or None if no table knows it."""
    row = next((p for p in PREFIXES if key.startswith(p.text)), None)
    if row is None:
        return None
    rest = key[len(row.text):]
    if row.style == "kohya":
        layer, _, tensor = rest.partition(".")
        return (row, layer, tensor) if tensor in KOHYA_TENSORS else None
    for suffix, tensor in DOTTED_SUFFIXES:
        if rest.endswith(suffix):
            return row, rest[: -len(suffix)], tensor
    return None


def group(tensors: dict[str, torch.Tensor]) -> tuple[list[FileLayer], list[str]]:
    """A file's tensors by layer, and the keys no table recognises."""
    layers: dict[tuple[str, str], FileLayer] = {}
    unknown = []
    for key in sorted(tensors):
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        row, name, tensor = parts
        layer = layers.setdefault((row.model, name), FileLayer(row.model, name, row.style))
        layer.tensors[tensor] = tensors[key]
        layer.keys[tensor] = key
    return list(layers.values()), unknown


def metadata_alpha(metadata: dict[str, str], layer: FileLayer) -> float | None:
    """alpha that a file's metadata gives ``layer`` (it has no ``alpha`` tensor): ldm's ``ldm.lora.alpha``, or
    diffusers' ``lora_adapter_metadata`` (PEFT's LoraConfig per model: ``lora_alpha``, ``alpha_pattern``,
    ``use_rslora``). None: alpha = rank."""
    if "ldm.lora.alpha" in metadata:
        return float(metadata["ldm.lora.alpha"])
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    prefix = f"{layer.model}."
    alpha = config.get(prefix + "lora_alpha")
    for pattern, value in (config.get(prefix + "alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", layer.name):
            alpha = value
    if alpha is None:
        return None
    if config.get(prefix + "use_rslora"):       # Kalajdzievski 2023: scale alpha / sqrt(r) = (alpha·sqrt(r)) / r
        rank = layer.tensors["lora_down.weight"].shape[0]
        return float(alpha) * rank ** 0.5
    return float(alpha)


def format_name(layers: list[FileLayer], metadata: dict[str, str]) -> str:
    """What to call the file in messages: ldm, kohya/A1111, LyCORIS or diffusers/PEFT."""
    if "ldm.lora.rank" in metadata:
        return "ldm"
    names = {t for layer in layers for t in layer.tensors}
    if names & {*LOHA_NAMES, *LOKR_NAMES, "lora_mid.weight"}:
        return "LyCORIS"
    return "kohya/A1111" if any(layer.style == "kohya" for layer in layers) else "diffusers/PEFT"
