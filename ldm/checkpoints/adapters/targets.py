"""Which weight a file's layer name means in ldm's models.

ldm's module names are diffusers' (U-Net) and transformers 5's (CLIP text model) state-dict names, so a dotted
name is looked up as is; a kohya name is the same path with "_" for ".", which the index undoes by listing
the model's own modules. The U-Net also answers to the original SD names (``input_blocks_4_1_proj_in``, as
kohya's SDXL LoRAs and some converters write them) through ``checkpoints.keys``' table; an OpenCLIP text tower
(SD 2 single files) answers to CLIP's names, its fused ``in_proj_weight`` split in three as the checkpoint
tables split it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ldm.checkpoints.keys import clip_keys, open_clip_key, unet_key
from ldm.models.text import TextEncoder
from ldm.models.unet import UNet

# Older spellings of a layer, tried when the name itself is not found: (model kind, theirs, ours).
ALIASES = (
    ("unet", ".processor", ""),                 # diffusers' attention-processor LoRA
    ("unet", ".to_out", ".to_out.0"),
    ("text", ".to_q", ".q_proj"), ("text", ".to_k", ".k_proj"), ("text", ".to_v", ".v_proj"),
    ("text", ".to_out", ".out_proj"),
)
TEXT_MODEL = "text_model."                      # transformers < 5 nests CLIPTextModel's modules under it


@dataclass(frozen=True, eq=False)
class Target:
    """A weight to patch: ``module.<param>``, or rows ``chunk`` of ``chunks`` of it (a fused projection)."""

    module: nn.Module
    param: str = "weight"
    chunk: int = 0
    chunks: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        full = tuple(getattr(self.module, self.param).shape)
        return (full[0] // self.chunks, *full[1:])

    def rows(self) -> slice:
        n = self.shape[0]
        return slice(self.chunk * n, (self.chunk + 1) * n)


def _layers(model: nn.Module) -> dict[str, Target]:
    return {name: Target(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _unet_names(unet: UNet) -> dict[str, Target]:
    names = _layers(unet)
    cfg = unet.config
    layers = list(cfg.per_level("layers_per_block"))
    up_attention = [t == "CrossAttnUpBlock2D" for t in cfg.up_block_types]
    for name, target in list(names.items()):
        original = unet_key(f"{name}.weight", layers, up_attention).removesuffix(".weight")
        names.setdefault(original, target)
    return names


def _text_names(encoder: TextEncoder) -> dict[str, Target]:
    if encoder.config.backend != "open_clip":
        return {name.removeprefix(TEXT_MODEL): t for name, t in _layers(encoder.model).items()}
    names = {}
    for key in clip_keys(encoder.config.num_hidden_layers):
        where = open_clip_key(key)
        module_name, _, param = where.theirs.rpartition(".")
        if key.endswith(".weight") and param.endswith("weight") and ("proj" in key or "fc" in key):
            names[key.removesuffix(".weight")] = Target(encoder.model.get_submodule(module_name), param,
                                                        where.chunk, where.chunks)
    return names


class LayerIndex:
    """Layer names -> :class:`Target` for each model a file may adapt (``{"unet": ..., "text_encoder": ...}``)."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models
        self.kinds = {k: "text" if isinstance(m, TextEncoder) else "unet" for k, m in models.items()}
        self.dotted: dict[str, dict[str, Target]] = {}
        self.kohya: dict[str, dict[str, Target]] = {}
        for key, model in models.items():
            if isinstance(model, UNet):
                names = _unet_names(model)
            elif isinstance(model, TextEncoder):
                names = _text_names(model)
            else:
                names = _layers(model)
            self.dotted[key] = names
            self.kohya[key] = {name.replace(".", "_"): t for name, t in names.items()}

    def find(self, model: str, name: str, style: str) -> Target | None:
        if model not in self.models:
            return None
        if style == "kohya":
            table = self.kohya[model]
            return table.get(name) or table.get(name.removeprefix(TEXT_MODEL.replace(".", "_")))
        table = self.dotted[model]
        name = name.removeprefix(TEXT_MODEL)
        if name in table:
            return table[name]
        for kind, theirs, ours in ALIASES:
            if kind == self.kinds[model] and theirs in name:
                name = name.replace(theirs, ours)
        return table.get(name)
