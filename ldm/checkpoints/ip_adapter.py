"""IP-Adapter files and their CLIP image encoders, read offline.

Files: tencent-ailab's ``.bin`` (``{"image_proj": {...}, "ip_adapter": {...}}``, read weights-only) or the flat
``.safetensors`` (``image_proj.*``, ``ip_adapter.*``); the projection (base, Plus / Plus-face, Full-face) and every
width come from the shapes (``ldm.models.ip_adapter``). The image encoder: a transformers
``CLIPVisionModelWithProjection`` folder (config.json + weights; its ``preprocessor_config.json`` when present,
else CLIP's preprocessing at the encoder's image size, as diffusers' ``load_ip_adapter`` sets it up), or a single
file of one (ComfyUI's ``clip_vision`` files), its config inferred from the shapes.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ldm.checkpoints.tensor_io import CheckpointError, error_list, load_tensors
from ldm.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attention_layers
from ldm.models.unet import UNet

IP_ADAPTER = "IP-Adapter"


def _count(shapes: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def infer_ip_adapter(path, shapes: dict) -> IPAdapterConfig:
    s = shapes
    layers, k = [], 1
    while f"ip_adapter.{k}.to_k_ip.weight" in s:
        inner, context = s[f"ip_adapter.{k}.to_k_ip.weight"]
        layers.append((context, inner))
        k += 2
    if not layers:
        raise CheckpointError(f"{path}: an IP-Adapter without ip_adapter.1.to_k_ip.weight")
    if "image_proj.norm.weight" in s and "image_proj.proj.0.weight" in s or _count(s, "image_proj.perceiver"):
        raise CheckpointError(f"{path}: an IP-Adapter FaceID (insightface embeddings), which ldm does not load yet")
    if "image_proj.latents" in s:
        _, tokens, width = s["image_proj.latents"]
        depth = _count(s, "image_proj.layers.{}.0.to_q.weight")
        return IPAdapterConfig("plus", s["image_proj.proj_in.weight"][1], s["image_proj.proj_out.weight"][0], tokens,
                               tuple(layers), depth=depth, width=width,
                               ff_mult=s["image_proj.layers.0.1.1.weight"][0] // width)
    if "image_proj.proj.0.weight" in s:
        return IPAdapterConfig("full", s["image_proj.proj.0.weight"][1], s["image_proj.proj.2.weight"][0], 0,
                               tuple(layers))
    if "image_proj.proj.weight" in s:
        context = s["image_proj.norm.weight"][0]
        out, image_dim = s["image_proj.proj.weight"]
        return IPAdapterConfig("base", image_dim, context, out // context, tuple(layers))
    found = sorted({k for k in s if k.startswith("image_proj.")})[:5]
    raise CheckpointError(f"{path}: an IP-Adapter with an image projection ldm does not know ({found})")


def load_ip_adapter(path, tensors: dict, unet: UNet | None) -> IPAdapter:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg = infer_ip_adapter(path, shapes)
    except KeyError as exc:
        raise CheckpointError(f"{path}: an IP-Adapter without {exc.args[0]} (needed to infer its configuration)") \
            from None
    if unet is not None:
        context = unet.config.per_level("cross_attention_dim")[0]
        theirs = [(p.attn2 if hasattr(p.attn2, "to_k") else p.attn2.attn) for p, _ in cross_attention_layers(unet)]
        want = [(a.to_k.in_features, a.to_k.out_features) for a in theirs]
        if cfg.context_dim != context or list(cfg.layers) != want:
            raise CheckpointError(f"{path}: an IP-Adapter for a U-Net with {len(cfg.layers)} cross-attention layers "
                                  f"and a {cfg.context_dim}-wide context; this pipeline's has {len(want)} and "
                                  f"{context}")
    with torch.device("meta"):
        model = IPAdapter(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [f"{k} (expected shape {list(v)})" for k, v in ours.items() if k not in shapes]
    misshaped = [f"{k}: expected {list(v)}, found {list(shapes[k])}" for k, v in ours.items()
                 if k in shapes and shapes[k] != v]
    unexpected = sorted(k for k in shapes if k not in ours)
    if missing or misshaped or unexpected:
        parts = [f"{path}: the weights do not match the IP-Adapter inferred from them:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                parts.append(f"  {len(items)} {title} key(s):\n{error_list(items)}")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict({k: tensors[k] for k in ours}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


VISION_PREFIX = "vision_model."
# OpenCLIP ViT-H/14 and ViT-bigG/14, the IP-Adapters' encoders: 16 heads, GELU (OpenAI's ViT-L/14 has QuickGELU).
VISION_HEADS, VISION_ACT = 16, "gelu"


def infer_vision_config(path, shapes: dict):
    """A CLIPVisionConfig from a transformers CLIPVisionModelWithProjection state dict's shapes. Heads and the
    activation are not in the shapes: 16 heads for widths of 1024 and more (ViT-L, H, bigG), else 64 channels a
    head; GELU, as the OpenCLIP towers IP-Adapters were trained with."""
    from transformers import CLIPVisionConfig

    try:
        hidden, _, patch, _ = shapes[VISION_PREFIX + "embeddings.patch_embedding.weight"]
        positions = shapes[VISION_PREFIX + "embeddings.position_embedding.weight"][0]
        return CLIPVisionConfig(
            hidden_size=hidden, patch_size=patch, image_size=patch * math.isqrt(positions - 1),
            intermediate_size=shapes[VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"][0],
            num_hidden_layers=_count(shapes, VISION_PREFIX + "encoder.layers.{}.mlp.fc1.weight"),
            num_attention_heads=VISION_HEADS if hidden >= 1024 else max(1, hidden // 64),
            projection_dim=shapes["visual_projection.weight"][0], hidden_act=VISION_ACT)
    except KeyError as exc:
        raise CheckpointError(f"image encoder {path}: not a CLIP vision model with projection (no {exc.args[0]})") \
            from None


def _encoder_from_file(path: Path, dtype):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    tensors = load_tensors(path, dtype)
    config = infer_vision_config(path, {k: tuple(v.shape) for k, v in tensors.items()})
    encoder = CLIPVisionModelWithProjection(config)   # not on meta: its position ids are a non-persistent buffer
    keys = set(encoder.state_dict())
    missing, unexpected = sorted(keys - set(tensors)), sorted(set(tensors) - keys - {
        VISION_PREFIX + "embeddings.position_ids"})
    if missing or unexpected:
        raise CheckpointError(f"image encoder {path}: the weights do not match a CLIP vision model:\n"
                              f"  missing:\n{error_list(missing)}\n  unexpected:\n{error_list(unexpected)}")
    encoder.load_state_dict({k: tensors[k] for k in keys}, strict=True, assign=True)
    size = config.image_size
    return encoder.to(dtype or torch.float32), CLIPImageProcessor(size=size, crop_size=size)


def load_image_encoder(folder, dtype=None):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a local transformers folder, or from a single
    .safetensors / .bin of one (its config inferred, ``infer_vision_config``)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = Path(folder)
    if folder.is_file():
        encoder, processor = _encoder_from_file(folder, dtype)
        return encoder.eval().requires_grad_(False), processor
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"image encoder {folder}: not a transformers CLIPVisionModelWithProjection folder "
                              "(config.json and its weights) or a file of one")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True,
                                                                dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"image encoder {folder}: not loadable ({exc})") from None
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.eval().requires_grad_(False), processor


def check_encoder(path, model: IPAdapter, encoder) -> None:
    cfg, enc = model.config, encoder.config
    width = enc.hidden_size if cfg.hidden_states else enc.projection_dim
    if width != cfg.image_dim:
        what = "hidden states" if cfg.hidden_states else "image embeddings"
        raise CheckpointError(f"{path}: this IP-Adapter takes {cfg.image_dim}-wide {what}; the image encoder gives "
                              f"{width}")
