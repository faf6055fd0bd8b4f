"""Control files: ControlNets and T2I-Adapters, their kind, layout and configuration read from the keys alone.

    model = load_control("control_v11p_sd15_canny.pth", unet)       # -> ControlNet | T2IAdapter

Kinds and layouts (key tables: ``ldm.checkpoints.control_keys``):
  ControlNet   original (``control_model.*``, or bare ``zero_convs.*`` / ``input_hint_block.*``; SD 1.x, 2.x, XL),
               diffusers (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``) as a single file or a
               ``ControlNetModel`` folder; a "difference" file (its U-Net copy stored as the difference from
               the base model: a ``difference`` key, as ControlNet's ``tool_transfer.py`` writes) gets the base
               U-Net's weights added
  T2I-Adapter  TencentARC's ``Adapter`` (full) and ``Adapter_light``, diffusers' ``T2IAdapter`` (``adapter.*``;
               full, light and SDXL's full_adapter_xl) as a single file or a folder
  IP-Adapter   ``image_proj.*`` + ``ip_adapter.*`` (flat .safetensors, or nested in a .bin), read by
               ``ldm.checkpoints.ip_adapter``
The configuration comes from the shapes, as for SD files (``ldm.checkpoints.infer``); what shapes cannot
give (attention heads) comes from the base U-Net the unit is loaded for when the widths agree, otherwise from the
family's rule (SD 1.x: 8 heads; later families: 64 channels per head). Nothing is downloaded. A file of another
kind (LoRA, SD checkpoint) or for another family is one CheckpointError naming the file and what it is.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ldm.checkpoints.control_keys import (CONTROL_PREFIX, DIFFUSERS_CONTROLNET, T2I_DIFFUSERS_PREFIX,
                                          controlnet_key, t2i_key)
from ldm.checkpoints.keys import KeyMap, check, gather
from ldm.checkpoints.ip_adapter import IP_ADAPTER, load_ip_adapter
from ldm.checkpoints.loading import _weight_files
from ldm.checkpoints.tensor_io import (PICKLE_SUFFIXES, CheckpointError, error_list, load_tensors, read_json,
                                      write_json, write_safetensors)
from ldm.models.controlnet import ControlNet, ControlNetConfig
from ldm.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ldm.models.unet import CROSS_DOWN, PLAIN_DOWN, UNet, UNetConfig

CONTROLNET, T2I_ADAPTER = "ControlNet", "T2I-Adapter"
SD1_HEADS, HEAD_CHANNELS = 8, 64
# What a file that is not a control unit is, by a key prefix it has (first match wins).
OTHER_KINDS = (
    ("lora_unet_", "a LoRA (kohya/A1111 layout); load it with pipe.load_lora"),
    ("lora_te", "a LoRA (kohya/A1111 layout); load it with pipe.load_lora"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint (U-Net); load it with Pipeline.from_pretrained"),
    ("lora_controlnet", "a Control-LoRA, which ldm does not load yet"),
)


def family_name(cfg: UNetConfig) -> str:
    """The SD family a U-Net (or ControlNet encoder) config belongs to, by its context width."""
    if cfg.addition_embed_type == "text_time":
        return "SDXL"
    width = cfg.per_level("cross_attention_dim")[0]
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, f"a {width}-wide text context")


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _count(shapes: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def detect(path, keys) -> tuple[str, str]:
    """(kind, layout) of a control file from its key names: layout "original", "diffusers" or "light" (T2I)."""
    keys = set(keys)
    if "lora_controlnet" in keys:
        raise CheckpointError(f"{path}: not loadable: this is a Control-LoRA, which ldm does not load yet")
    if _has(keys, "image_proj.") and _has(keys, "ip_adapter."):
        return IP_ADAPTER, "original"
    if _has(keys, CONTROL_PREFIX) or _has(keys, "zero_convs.") or _has(keys, "input_hint_block."):
        return CONTROLNET, "original"
    if any(_has(keys, p) for p in DIFFUSERS_CONTROLNET):
        return CONTROLNET, "diffusers"
    if _has(keys, T2I_DIFFUSERS_PREFIX + "body."):
        return T2I_ADAPTER, "diffusers"
    if _has(keys, "body.0.body.0.block1."):
        return T2I_ADAPTER, "light"
    if "conv_in.weight" in keys and _has(keys, "body.0.block1."):
        if _has(keys, "body.0.skep."):
            raise CheckpointError(f"{path}: a T2I-Adapter with skip convolutions (sk=False), which ldm does not "
                                  "load yet")
        return T2I_ADAPTER, "original"
    for prefix, what in OTHER_KINDS:
        if any(k.startswith(prefix) or f".{prefix}" in k for k in keys):
            raise CheckpointError(f"{path}: not a ControlNet or T2I-Adapter: this is {what}")
    if any(".lora_down." in k or ".lora_A." in k or "lora_up" in k for k in keys):
        raise CheckpointError(f"{path}: not a ControlNet or T2I-Adapter: this is a LoRA; load it with pipe.load_lora")
    sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
    raise CheckpointError(f"{path}: not a ControlNet or T2I-Adapter (no control_model.*, zero_convs.*, "
                          f"controlnet_cond_embedding.* or T2I-Adapter body.* keys; found: {sample})")


# -- ControlNet configuration from shapes ------------------------------------------------------------------------
def _levels_original(s: dict, path):
    """(widths, layers, cross, depths) of the U-Net copy in the original layout (as infer.infer_unet reads them)."""
    widths, layers, cross, depth, k = [], [], [], [], 1
    while True:
        n = 0
        while f"input_blocks.{k + n}.0.in_layers.0.weight" in s:
            n += 1
        if n == 0:
            raise CheckpointError(f"{path}: missing key input_blocks.{k}.0.in_layers.0.weight (needed to infer the "
                                  "ControlNet's levels)")
        widths.append(s[f"input_blocks.{k}.0.out_layers.3.weight"][0])
        layers.append(n)
        cross.append(f"input_blocks.{k}.1.proj_in.weight" in s)
        depth.append(_count(s, f"input_blocks.{k}.1.transformer_blocks.{{}}.attn1.to_q.weight") or 1)
        k += n
        if f"input_blocks.{k}.0.op.weight" not in s:
            return widths, layers, cross, depth
        k += 1


def _levels_diffusers(s: dict, path):
    levels = _count(s, "down_blocks.{}.resnets.0.conv1.weight")
    if levels == 0:
        raise CheckpointError(f"{path}: missing key down_blocks.0.resnets.0.conv1.weight (needed to infer the "
                              "ControlNet's levels)")
    widths = [s[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)]
    layers = [_count(s, f"down_blocks.{i}.resnets.{{}}.conv1.weight") for i in range(levels)]
    cross = [f"down_blocks.{i}.attentions.0.proj_in.weight" in s for i in range(levels)]
    depth = [_count(s, f"down_blocks.{i}.attentions.0.transformer_blocks.{{}}.attn1.to_q.weight") or 1
             for i in range(levels)]
    return widths, layers, cross, depth


# where each fact lives, per layout: (mid attention, hint conv_in, hint block pattern, time MLP input, conv_in)
_PLACES = {
    "original": ("middle_block.1.", "input_hint_block.0.weight", "input_hint_block.{}.weight", "label_emb.0.0.weight",
                 "input_blocks.0.0.weight"),
    "diffusers": ("mid_block.attentions.0.", "controlnet_cond_embedding.conv_in.weight",
                  "controlnet_cond_embedding.blocks.{}.weight", "add_embedding.linear_1.weight", "conv_in.weight"),
}


def infer_controlnet(path, shapes: dict, layout: str, base: UNetConfig | None) -> ControlNetConfig:
    """A ControlNet's config from its (prefix-stripped) shapes."""
    mid, hint_in, hint_block, added, conv_in = _PLACES[layout]
    s = shapes
    for key in (hint_in, conv_in, mid + "proj_in.weight"):
        if key not in s:
            raise CheckpointError(f"{path}: missing key {key} (needed to infer the ControlNet's configuration)")
    widths, layers, cross, depth = (_levels_original if layout == "original" else _levels_diffusers)(s, path)
    mid_depth = _count(s, mid + "transformer_blocks.{}.attn1.to_q.weight") or 1
    used = {d for d, c in zip(depth, cross) if c} | {mid_depth}
    depths = used.pop() if len(used) == 1 else [*depth[:-1], depth[-1] if cross[-1] else mid_depth]
    context = next(v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    if layout == "original":   # the hint block: conv (SiLU conv)*: pairs of 3x3 then stride-2 convs, then conv_out
        convs = [i for i in range(0, 64, 2) if hint_block.format(i) in s]
        hint_widths = [s[hint_in][0], *(s[hint_block.format(i)][0] for i in convs[2:-1:2])]
    else:
        blocks = _count(s, hint_block)
        hint_widths = [s[hint_in][0], *(s[hint_block.format(i)][0] for i in range(1, blocks, 2))]
    same_widths = base is not None and list(base.block_out_channels) == widths
    if same_widths:
        heads = list(base.heads())
    elif context == 768:
        heads = SD1_HEADS
    else:
        heads = [max(1, w // HEAD_CHANNELS) for w in widths]
    config = {
        "in_channels": s[conv_in][1],
        "block_out_channels": widths,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": [CROSS_DOWN if c else PLAIN_DOWN for c in cross],
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "use_linear_projection": len(s[mid + "proj_in.weight"]) == 2,
        "transformer_layers_per_block": depths,
        "upcast_attention": bool(base is not None and same_widths and base.upcast_attention),
        "conditioning_channels": s[hint_in][1],
        "conditioning_embedding_out_channels": hint_widths,
    }
    if added in s:
        width = s[added][1]
        time_dim = base.addition_time_embed_dim if base is not None and base.addition_time_embed_dim else 256
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=width)
    try:
        return ControlNetConfig.from_dict(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unsupported ControlNet configuration: {exc}") from None


# -- T2I-Adapter configuration from shapes -----------------------------------------------------------------------
def _unshuffle(path, unshuffled: int) -> tuple[int, int]:
    """(image channels, downscale factor f) from the width after pixel unshuffle, c·f² (RGB before grey)."""
    for channels in (3, 1):
        factor = math.isqrt(unshuffled // channels)
        if channels * factor * factor == unshuffled:
            return channels, factor
    raise CheckpointError(f"{path}: unsupported T2I-Adapter: its first layer takes {unshuffled} channels, not an "
                          "RGB or grey image pixel-unshuffled")


def infer_t2i(path, shapes: dict, latent_factor: int = 8) -> T2IAdapterConfig:
    """A T2I-Adapter's config from its shapes in diffusers' names. ``latent_factor``: the VAE's (SD: 8); an adapter
    unshuffling by twice that is SDXL's full_adapter_xl."""
    s = shapes
    light = "adapter.body.0.out_conv.weight" in s
    blocks = _count(s, "adapter.body.{}.resnets.0.block1.weight")
    if blocks == 0:
        raise CheckpointError(f"{path}: missing key adapter.body.0.resnets.0.block1.weight (needed to infer the "
                              "T2I-Adapter's configuration)")
    resnets = _count(s, "adapter.body.0.resnets.{}.block1.weight")
    if light:
        channels, factor = _unshuffle(path, s["adapter.body.0.in_conv.weight"][1])
        widths = [s[f"adapter.body.{i}.out_conv.weight"][0] for i in range(blocks - 1)]
        kind = "light_adapter"
    else:
        channels, factor = _unshuffle(path, s["adapter.conv_in.weight"][1])
        widths = [s[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in range(blocks)]
        kind = "full_adapter_xl" if factor == 2 * latent_factor else "full_adapter"
    return T2IAdapterConfig(in_channels=channels, channels=widths, num_res_blocks=resnets, downscale_factor=factor,
                            adapter_type=kind)


def _t2i_original_shapes(shapes: dict, layout: str, levels: int) -> dict:
    """TencentARC's flat ``body.k`` numbering read as ours, to infer the config (levels: the base U-Net's)."""
    if layout == "light":
        return {T2I_DIFFUSERS_PREFIX + k.replace(".body.", ".resnets.", 1) if k.startswith("body.") else
                T2I_DIFFUSERS_PREFIX + k: v for k, v in shapes.items()}
    total = _count(shapes, "body.{}.block1.weight")
    n = max(total // levels, 1)
    out = {"adapter.conv_in.weight": shapes["conv_in.weight"]}
    for k in range(total):
        out[f"adapter.body.{k // n}.resnets.{k % n}.block1.weight"] = shapes[f"body.{k}.block1.weight"]
    return out


# -- loading -----------------------------------------------------------------------------------------------------
def _strict(path, what: str, module: torch.nn.Module, maps: list[KeyMap], tensors: dict, ignorable=()) -> dict:
    """Our state dict from the file's tensors through ``maps``; one error listing every mismatch."""
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    file_shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, misshaped = check(maps, file_shapes, ours)
    used = {m.theirs for m in maps}
    unexpected = sorted(k for k in file_shapes if k not in used and k not in ignorable)
    if missing or misshaped or unexpected:
        parts = [f"{path}: the weights do not match the {what} inferred from them:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                parts.append(f"  {len(items)} {title} key(s):\n{error_list(items)}")
        raise CheckpointError("\n".join(parts))
    return gather(maps, tensors)


def _read(path: Path, dtype) -> tuple[dict, dict | None]:
    """(tensors, diffusers config or None) of a file or a diffusers folder."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: a folder without config.json (a diffusers ControlNetModel or "
                                  "T2IAdapter folder has one)")
        tensors = {}
        for f in _weight_files(path, "diffusion_pytorch_model"):
            tensors.update(load_tensors(f, dtype))
        return tensors, read_json(config_file)
    if not path.is_file():
        raise CheckpointError(f"control file {path} does not exist")
    tensors = load_tensors(path, dtype)
    if not tensors and path.suffix in PICKLE_SUFFIXES:   # tensors one level down: an IP-Adapter .bin
        nested = torch.load(path, map_location="cpu", weights_only=True)   # load_tensors found it safe
        tensors = {f"{outer}.{k}": v.to(dtype) if dtype is not None and v.is_floating_point() else v
                   for outer, inner in nested.items() if isinstance(inner, dict)
                   for k, v in inner.items() if isinstance(v, torch.Tensor)}
    return tensors, None


def _check_family(path, config: ControlNetConfig, base: UNetConfig | None) -> None:
    if base is None:
        return
    ours, theirs = family_name(config.unet), family_name(base)
    if ours != theirs or config.unet.per_level("cross_attention_dim") != base.per_level("cross_attention_dim"):
        raise CheckpointError(f"{path}: a ControlNet for {ours}; this pipeline's model is {theirs}")
    skips = [base.block_out_channels[0]]
    for i, (w, n) in enumerate(zip(base.block_out_channels, base.per_level("layers_per_block"))):
        skips += [w] * (n + (i < base.levels - 1))
    mine = [c.out_channels for c in _zero_convs(config)]
    if mine != skips:
        raise CheckpointError(f"{path}: a ControlNet whose residuals ({mine}) do not fit this pipeline's U-Net "
                              f"(skips of {skips} channels)")


def _zero_convs(config: ControlNetConfig):
    with torch.device("meta"):
        return list(ControlNet(config).controlnet_down_blocks)


def _difference(model: ControlNet, state: dict, base: UNet | None, path) -> dict:
    """A "difference" ControlNet: its U-Net copy plus the base U-Net's weights, name for name."""
    if base is None:
        raise CheckpointError(f"{path}: a 'difference' ControlNet needs the base model it was made from")
    base_state = base.state_dict()
    return {k: v + base_state[k].to(v.dtype) if k in base_state and base_state[k].shape == v.shape else v
            for k, v in state.items()}


def load_control(path, unet: UNet | None = None, *, dtype: torch.dtype | None = None, latent_factor: int = 8):
    """A ControlNet, T2IAdapter or IPAdapter (eval mode, no grad) from a file or folder, checked against ``unet``
    (the base U-Net: family, residual shapes, heads) when given. ``latent_factor``: the base VAE's downscaling."""
    path = Path(path)
    base = unet.config if unet is not None else None
    tensors, config = _read(path, dtype)
    if config is not None:
        kind = {"ControlNetModel": CONTROLNET, "T2IAdapter": T2I_ADAPTER}.get(config.get("_class_name"))
        if kind is None:
            raise CheckpointError(f"{path}: a diffusers {config.get('_class_name')!r} folder, not a ControlNetModel "
                                  "or T2IAdapter")
        layout = "diffusers"
    else:
        kind, layout = detect(path, tensors)
    if kind == CONTROLNET:
        model = _load_controlnet(path, tensors, config, layout, base, unet)
    elif kind == IP_ADAPTER:
        model = load_ip_adapter(path, tensors, unet)
    else:
        model = _load_t2i(path, tensors, config, layout, base, latent_factor)
    return model.eval().requires_grad_(False)


def save_controlnet(model: ControlNet, folder, dtype: torch.dtype | None = None) -> Path:
    """``folder`` as a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model.safetensors), the
    weights in ``dtype`` (None: as they are); ``load_control`` and diffusers' ``ControlNetModel.from_pretrained``
    read it."""
    folder = Path(folder)
    # weights first: a folder with config.json is whole (each file is itself written atomically)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors",
                      {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                       for k, v in model.state_dict().items()})
    write_json(folder / "config.json", {"_class_name": "ControlNetModel", **model.config.to_dict()})
    return folder


def _load_controlnet(path, tensors, config, layout, base, unet):
    difference = "difference" in tensors
    if layout == "original" and _has(tensors, CONTROL_PREFIX):   # the ControlNet, maybe beside a whole SD model
        tensors = {k.removeprefix(CONTROL_PREFIX): v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    tensors.pop("difference", None)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg = ControlNetConfig.from_dict(config) if config is not None else \
            infer_controlnet(path, shapes, layout, base)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unsupported ControlNet configuration: {exc}") from None
    _check_family(path, cfg, base)
    with torch.device("meta"):
        model = ControlNet(cfg)
    keys = list(model.state_dict())
    if layout == "original":
        hint_blocks = len(cfg.conditioning_embedding_out_channels) * 2 - 2
        layers = list(cfg.unet.per_level("layers_per_block"))
        maps = [KeyMap(k, controlnet_key(k, layers, hint_blocks)) for k in keys]
    else:
        maps = [KeyMap(k, k) for k in keys]
    state = _strict(path, f"{family_name(cfg.unet)} ControlNet", model, maps, tensors)
    if difference:
        state = _difference(model, state, unet, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _load_t2i(path, tensors, config, layout, base, latent_factor):
    levels = base.levels if base is not None else 4
    if layout in ("original", "light"):
        shapes = _t2i_original_shapes({k: tuple(v.shape) for k, v in tensors.items()}, layout, levels)
    else:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg = T2IAdapterConfig.from_dict(config) if config is not None else infer_t2i(path, shapes, latent_factor)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unsupported T2I-Adapter configuration: {exc}") from None
    if base is not None:
        xl = cfg.adapter_type == "full_adapter_xl"
        family = family_name(base)
        if xl != (family == "SDXL"):
            raise CheckpointError(f"{path}: a T2I-Adapter for {'SDXL' if xl else 'SD 1.x/2.x'}; this pipeline's "
                                  f"model is {family}")
        widths = list(base.block_out_channels)
        if list(cfg.feature_channels()[:len(widths)]) != widths:
            raise CheckpointError(f"{path}: a T2I-Adapter whose features ({list(cfg.feature_channels())} channels) "
                                  f"do not fit this pipeline's U-Net (levels of {widths} channels)")
    with torch.device("meta"):
        model = T2IAdapter(cfg)
    keys = list(model.state_dict())
    if layout in ("original", "light"):
        maps = [KeyMap(k, t2i_key(k, cfg.adapter_type, cfg.num_res_blocks)) for k in keys]
    else:
        maps = [KeyMap(k, k) for k in keys]
    state = _strict(path, "T2I-Adapter", model, maps, tensors)
    model.load_state_dict(state, strict=True, assign=True)
    return model
