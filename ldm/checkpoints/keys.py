"""Key tables between ldm's modules (diffusers names) and the original Stable Diffusion single-file layout.

The SD names are those of the CompVis / Stability AI code (github.com/CompVis/stable-diffusion,
github.com/Stability-AI/stablediffusion): ``openaimodel.py``'s UNetModel under ``model.diffusion_model.``,
``autoencoder.py``'s AutoencoderKL under ``first_stage_model.``, the text encoder under ``cond_stage_model.``
(transformers CLIPTextModel as ``.transformer.text_model.`` for SD 1.x; the OpenCLIP model as ``.model.`` for
SD 2.x). The pairing is the one diffusers' ``convert_original_stable_diffusion_to_diffusers.py`` established.
SDXL files (Stability AI's github.com/Stability-AI/generative-models, "sgm") keep the U-Net and VAE names, add
the micro-conditioning MLP as ``label_emb.0`` and hold their text encoders under ``conditioner.embedders.N.``
(CLIP ViT-L as a transformers CLIPTextModel, OpenCLIP ViT-bigG as the OpenCLIP model, as SD 2.x), the pairing
of diffusers' ``scripts/convert_diffusers_to_original_sdxl.py`` and ``loaders/single_file_utils.py``.

Most of the conversion is the tables below (module path pieces, ours -> theirs); the rest is index
arithmetic: the original U-Net numbers its blocks sequentially (``input_blocks.k``), diffusers nests them
(``down_blocks.level.resnets.j``), and the original VAE decoder counts its levels from the bottom up.
Every function maps one of *our* keys to the file's key; the loader enumerates our module's keys, so no
reverse table is needed and any file key left over is reported as unexpected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_PREFIX_OLD = "cond_stage_model.transformer."       # files written with transformers < 4.22 (no text_model)
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL's conditioner (sgm): the base has CLIP ViT-L at embedders.0 (a CLIPTextModel; transformers 5 saves it without
# "text_model.") and OpenCLIP ViT-bigG at embedders.1; the refiner has bigG alone, at embedders.0.
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_PREFIX_BARE = "conditioner.embedders.0.transformer."
SDXL_BIG_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
# Each family's text encoders in a single file, in prompt order: (key layout, prefix). What save_single_file
# writes; load also reads CLIP_PREFIX_OLD and SDXL_CLIP_PREFIX_BARE in place of the "clip" prefixes.
SINGLE_FILE_TEXT = {
    "sd1": (("clip", CLIP_PREFIX),),
    "sd2": (("open_clip", OPEN_CLIP_PREFIX),),
    "sdxl": (("clip", SDXL_CLIP_PREFIX), ("open_clip", SDXL_BIG_G_PREFIX)),
    "sdxl_refiner": (("open_clip", SDXL_REFINER_PREFIX),),
}
# LitEma (CompVis ldm/modules/ema.py) keeps one buffer per parameter of LatentDiffusion.model, named with the
# dots removed ("diffusion_model.out.2.weight" -> "model_ema.diffusion_modelout2weight"), plus these two.
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

# -- U-Net ------------------------------------------------------------------------------------------------
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",      # SDXL's micro-conditioning MLP (openaimodel's label_emb:
    "add_embedding.linear_2": "label_emb.0.2",      # Sequential(Sequential(Linear, SiLU, Linear)))
}
UNET_RESNET = {      # diffusers ResnetBlock2D -> openaimodel ResBlock (in_layers = GroupNorm, SiLU, Conv, ...)
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
# Attention blocks (SpatialTransformer <-> Transformer2DModel) use the same inner names in both layouts.

# -- VAE --------------------------------------------------------------------------------------------------
VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_MID = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# -- text: transformers CLIPTextModel (5.x names) -> OpenCLIP text tower ---------------------------------
OPEN_CLIP_FIXED = {
    "embeddings.token_embedding": "token_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm": "ln_final",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
# nn.MultiheadAttention fuses the query, key and value projections into one in_proj tensor, in that order.
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")
# OpenCLIP's text_projection is a bare (width, embed) matrix applied as x @ P; transformers' is a Linear, (embed,
# width). diffusers' conversion script writes the Linear as "text_projection.weight" unchanged; load takes either.
OPEN_CLIP_PROJECTION = ("text_projection.weight", "text_projection")


@dataclass(frozen=True)
class KeyMap:
    """One of our tensors and where it lives in a file: ``theirs``, or chunk ``chunk`` of ``chunks`` of it
    along dim 0 when the file fuses several of our tensors (OpenCLIP's in_proj). ``conv``: the file stores
    our linear weight (out, in) as a 1x1 convolution (out, in, 1, 1) (the original VAE's attention).
    ``transpose``: the file stores our 2-D tensor transposed (OpenCLIP's text_projection)."""

    ours: str
    theirs: str
    chunk: int = 0
    chunks: int = 1
    conv: bool = False
    transpose: bool = False


def _rename(path: str, table: dict[str, str]) -> str:
    """Replace the longest leading module path of ``path`` found in ``table``; unchanged if none matches."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return path


def _offsets(layers: list[int], extra: int) -> list[int]:
    """Sequential index of each level's first block when level i holds layers[i] + extra blocks."""
    starts, k = [], 0
    for n in layers:
        starts.append(k)
        k += n + extra
    return starts


_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")


def unet_key(key: str, layers_per_block: list[int], up_has_attention: list[bool]) -> str:
    """Our (diffusers) U-Net key -> the SD file key, without the ``model.diffusion_model.`` prefix.

    ``input_blocks``: 0 is conv_in, then per level its resnets (+ attention as sub-module 1) and, except at
    the bottom, a downsampler (``.0.op``). ``output_blocks``: per up level, layers + 1 resnets; the last one
    also carries the upsampler as sub-module 1 (2 after an attention).
    """
    if key.startswith("mid_block."):
        kind, index, inner = key[len("mid_block."):].split(".", 2)
        return f"{UNET_MID[kind + '.' + index]}.{_rename(inner, UNET_RESNET) if kind == 'resnets' else inner}"
    match = _BLOCK.fullmatch(key)
    if not match:
        return _rename(key, UNET_FIXED)
    side, level, kind, j, rest = match.groups()
    level, j = int(level), int(j)
    if kind == "resnets":
        rest = _rename(rest, UNET_RESNET)
    if side == "down_blocks":
        start = 1 + _offsets(layers_per_block, 1)[level]
        if kind == "downsamplers":
            return f"input_blocks.{start + layers_per_block[level]}.0.{rest.replace('conv.', 'op.', 1)}"
        return f"input_blocks.{start + j}.{0 if kind == 'resnets' else 1}.{rest}"
    up_layers = layers_per_block[::-1]
    start = _offsets(up_layers, 1)[level]
    if kind == "upsamplers":
        return f"output_blocks.{start + up_layers[level]}.{2 if up_has_attention[level] else 1}.{rest}"
    return f"output_blocks.{start + j}.{0 if kind == 'resnets' else 1}.{rest}"


def vae_key(key: str, levels: int) -> str:
    """Our (diffusers) AutoencoderKL key -> the SD file key, without the ``first_stage_model.`` prefix."""
    coder, _, rest = key.partition(".")
    if rest.startswith("mid_block."):
        kind, index, inner = rest[len("mid_block."):].split(".", 2)
        table = VAE_RESNET if kind == "resnets" else VAE_ATTENTION
        return f"{coder}.{VAE_MID[kind + '.' + index]}.{_rename(inner, table)}"
    match = _BLOCK.fullmatch(rest)
    if not match:
        return _rename(key, VAE_FIXED)
    _, level, kind, j, inner = match.groups()
    level = int(level)
    if coder == "decoder":
        level = levels - 1 - level            # the original decoder's up[0] is the highest-resolution level
    name = "down" if coder == "encoder" else "up"
    if kind == "resnets":
        return f"{coder}.{name}.{level}.block.{j}.{_rename(inner, VAE_RESNET)}"
    sampler = "downsample" if kind == "downsamplers" else "upsample"
    return f"{coder}.{name}.{level}.{sampler}.{inner}"


_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.*)")


def open_clip_key(key: str) -> KeyMap:
    """A CLIPTextModel key (transformers 5 names) -> where it lives in an OpenCLIP text tower's state dict."""
    if key == OPEN_CLIP_PROJECTION[0]:
        return KeyMap(key, OPEN_CLIP_PROJECTION[1], transpose=True)
    match = _LAYER.fullmatch(key)
    if not match:
        return KeyMap(key, _rename(key, OPEN_CLIP_FIXED))
    layer, rest = match.groups()
    module, _, param = rest.rpartition(".")
    block = f"transformer.resblocks.{layer}."
    for i, name in enumerate(OPEN_CLIP_QKV):
        if module == f"self_attn.{name}":
            return KeyMap(key, f"{block}attn.in_proj_{param}", i, len(OPEN_CLIP_QKV))
    return KeyMap(key, block + _rename(rest, OPEN_CLIP_LAYER))


def unet_keymaps(keys, layers_per_block: list[int], up_has_attention: list[bool], prefix=UNET_PREFIX):
    return [KeyMap(k, prefix + unet_key(k, layers_per_block, up_has_attention)) for k in keys]


def vae_keymaps(keys, levels: int, prefix=VAE_PREFIX):
    def conv(key):
        return ".attentions." in key and key.endswith(".weight") and not key.split(".")[-2] == "group_norm"

    return [KeyMap(k, prefix + vae_key(k, levels), conv=conv(k)) for k in keys]


def text_keymaps(keys, file_layout: str, backend: str, prefix: str | None = None, file_keys=None):
    """Text encoder keys (TextEncoder.weights() names) -> single-file keys. file_layout: "clip" (a transformers
    CLIPTextModel: SD 1.x, SDXL's CLIP-L), "clip_old" (SD 1.x written by transformers < 4.22) or "open_clip"
    (SD 2.x, SDXL's bigG); backend: the encoder's ("open_clip" names equal the file's; a "transformers" encoder
    in an OpenCLIP file has q/k/v fused and its projection transposed). prefix: where the encoder lives (default:
    the SD 1.x / 2.x place). file_keys: the file's keys, to take a projection stored as a Linear instead."""
    if prefix is None:
        prefix = {"clip": CLIP_PREFIX, "clip_old": CLIP_PREFIX_OLD, "open_clip": OPEN_CLIP_PREFIX}[file_layout]
    if file_layout in ("clip", "clip_old") or backend == "open_clip":
        return [KeyMap(k, prefix + k) for k in keys]
    maps = [open_clip_key(k) for k in keys]
    linear = file_keys is not None and prefix + OPEN_CLIP_PROJECTION[1] not in file_keys and \
        prefix + OPEN_CLIP_PROJECTION[0] in file_keys
    return [KeyMap(m.ours, prefix + m.ours, transpose=False) if linear and m.transpose else
            KeyMap(m.ours, prefix + m.theirs, m.chunk, m.chunks, transpose=m.transpose) for m in maps]


def ema_key(file_key: str) -> str:
    """The LitEma buffer name holding the EMA copy of U-Net parameter ``model.diffusion_model.*``."""
    return EMA_PREFIX + file_key[len("model."):].replace(".", "")


# -- applying key maps ----------------------------------------------------------------------------------
def file_shape(m: KeyMap, ours_shape: tuple) -> tuple:
    """The shape the file's tensor must have for our tensor of shape ``ours_shape``."""
    if m.transpose:
        return tuple(reversed(ours_shape))
    shape = (ours_shape[0] * m.chunks, *ours_shape[1:])
    return (*shape, 1, 1) if m.conv else shape


def check(maps, file_shapes: dict, our_shapes: dict) -> tuple[list[str], list[str]]:
    """(missing, mis-shaped) descriptions, one per file key. A conv-stored weight may also come as linear."""
    missing, misshaped, seen = [], [], set()
    for m in maps:
        if m.theirs in seen:
            continue
        seen.add(m.theirs)
        want = file_shape(m, tuple(our_shapes[m.ours]))
        if m.theirs not in file_shapes:
            missing.append(f"{m.theirs} (expected shape {list(want)})")
            continue
        found = tuple(file_shapes[m.theirs])
        if found != want and not (m.conv and found == want[:-2]):
            misshaped.append(f"{m.theirs}: expected {list(want)}, found {list(found)}")
    return missing, misshaped


def gather(maps, tensors: dict) -> dict:
    """Our tensors from a file's (already checked) tensors."""
    out = {}
    for m in maps:
        t = tensors[m.theirs]
        if m.chunks > 1:
            t = t.chunk(m.chunks, dim=0)[m.chunk]
        if m.conv and t.ndim == 4:
            t = t[:, :, 0, 0]
        if m.transpose:
            t = t.t().contiguous()
        out[m.ours] = t
    return out


def scatter(maps, tensors: dict) -> dict:
    """A file's tensors from ours: fused chunks are concatenated in chunk order, 1x1 convs restored."""
    import torch

    out, parts = {}, {}
    for m in maps:
        t = tensors[m.ours]
        if m.conv:
            t = t[:, :, None, None]
        if m.transpose:
            t = t.t().contiguous()
        if m.chunks > 1:
            parts.setdefault(m.theirs, [None] * m.chunks)[m.chunk] = t
        else:
            out[m.theirs] = t
    for name, chunks in parts.items():
        out[name] = torch.cat(chunks, dim=0)
    return out


# -- text encoders between backends ---------------------------------------------------------------------
CLIP_TOP = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
            "final_layer_norm.weight", "final_layer_norm.bias")
CLIP_LAYER = tuple(f"{module}.{param}" for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.out_proj", "layer_norm1", "layer_norm2",
                                                      "mlp.fc1", "mlp.fc2") for param in ("weight", "bias"))
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)")


def clip_keys(layers: int) -> list[str]:
    """The tensor names of a CLIPTextModel with ``layers`` layers (transformers 5 names)."""
    return [*CLIP_TOP, *(f"encoder.layers.{i}.{p}" for i in range(layers) for p in CLIP_LAYER)]


def convert_text(weights: dict, config, target: str):
    """A text encoder's weights and config in another backend's layout -> (weights, config).

    target "transformers": CLIPTextModel names, context from the last layer (SD 1.x files, diffusers folders;
    layers the context never uses are dropped, as diffusers' SD 2 conversion drops OpenCLIP's 24th layer).
    target "open_clip": OpenCLIP names, context from the penultimate layer, as every SD 2.x consumer reads
    these files. A model whose own last layer is the context layer gets one extra, never-used layer (a copy
    of its last) and, if it has none, an identity text projection; neither changes the context.
    """
    import dataclasses

    import torch

    layers, skip = config.num_hidden_layers, config.skip_layers
    if target == "transformers":
        keep = layers - skip
        if config.backend == "open_clip":
            weights = gather([open_clip_key(k) for k in clip_keys(keep)], weights)
        else:
            weights = {k: weights[k] for k in clip_keys(keep)}
        return weights, dataclasses.replace(config, backend="transformers", num_hidden_layers=keep, skip_layers=0)
    if target != "open_clip":
        raise ValueError(f"unknown text layout {target!r}")
    keep = layers - skip + 1
    if config.backend == "transformers":
        weights = scatter([open_clip_key(k) for k in clip_keys(layers)], weights)
    out = {}
    for name, tensor in weights.items():
        match = _RESBLOCK.fullmatch(name)
        if match and int(match.group(1)) >= keep:
            continue
        out[name] = tensor
        if match and int(match.group(1)) == layers - 1 and keep > layers:
            out[f"transformer.resblocks.{layers}.{match.group(2)}"] = tensor.clone()
    if "text_projection" not in out:
        out["text_projection"] = torch.eye(config.hidden_size, dtype=out["token_embedding.weight"].dtype)
    return out, dataclasses.replace(config, backend="open_clip", num_hidden_layers=keep, skip_layers=1,
                                    projection_dim=out["text_projection"].shape[1])
