"""Model configuration of an SD single file, inferred from its tensor shapes.

Shapes fix almost everything: channel widths, levels, layers per level, which levels attend, the context width,
the in/out channels (9 input channels = inpainting), the text encoder's size. They cannot fix the number of
attention heads, the sample size or the prediction type; for those we take, in order: the ``ldm.*`` metadata
that ldm's own ``save_single_file`` writes, then a sidecar ``<name>.yaml`` (the original SD inference config),
then the SD family's known values (SD 1.x: 8 heads everywhere; SD 2.x and SDXL: 64 channels per head; CLIP text
towers: 64 channels per head).

SDXL (sgm's layout, ``conditioner.embedders.*``): the base has CLIP ViT-L and OpenCLIP ViT-bigG, the refiner
bigG alone. Both read each encoder's penultimate layer without the final norm, and bigG's pooled projection. The
micro-conditioning MLP (``label_emb.0.0``) takes [pooled (bigG's projection width) ‖ n time ids × d sinusoids]:
n = 6 for the base (sizes and crop), 5 for the refiner (the aesthetic score in place of the target size), so d
(256 in both released models: 1280 + 6·256 = 2816, 1280 + 5·256 = 2560) follows from the shapes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ldm.checkpoints.keys import (CLIP_PREFIX, CLIP_PREFIX_OLD, EMA_BOOKKEEPING, EMA_PREFIX, OPEN_CLIP_PREFIX,
                                  OPEN_CLIP_PROJECTION, SDXL_BIG_G_PREFIX, SDXL_CLIP_PREFIX, SDXL_CLIP_PREFIX_BARE,
                                  SDXL_PREFIX, SDXL_REFINER_PREFIX, UNET_PREFIX, VAE_PREFIX)
from ldm.checkpoints.tensor_io import CheckpointError
from ldm.models.text import TextEncoderConfig

CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
HEAD_CHANNELS = 64               # SD 2.x U-Net (num_head_channels: 64) and both CLIP text towers
SD1_HEADS = 8                    # SD 1.x U-Net (num_heads: 8)
SDXL_SAMPLE_SIZE = 128          # SDXL base and refiner: 1024 px (diffusers' configs of both)
SDXL_SCALING_FACTOR = 0.13025    # SDXL's VAE (sgm's sd_xl_base.yaml scale_factor; diffusers' vae config)
# Diffusers pipeline flags of the SDXL families (model_index.json of stable-diffusion-xl-base-1.0 / -refiner-1.0).
SDXL_PIPELINE_FLAGS = {"sdxl": {"force_zeros_for_empty_prompt": True},
                       "sdxl_refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}
SDXL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}
# Other model families, recognised only to say so (key names from their reference implementations and the
# detection keys of diffusers' single_file_utils.CHECKPOINT_KEY_NAMES).
OTHER_FAMILIES = {
    "model.diffusion_model.joint_blocks.": "SD3",
    "joint_blocks.": "SD3",
    "double_blocks.": "Flux",
    "model.diffusion_model.double_blocks.": "Flux",
    "clip_txt_mapper.": "Stable Cascade (stage C)",
    "down_blocks.1.0.channelwise.": "Stable Cascade (stage B)",
}
UNCLIP = "SD 2.x unCLIP / upscaler (class-conditioned U-Net)"


@dataclass
class Hints:
    """Facts a file's shapes cannot give; from the sidecar yaml or ldm's metadata."""

    prediction_type: str | None = None
    num_heads: int | None = None
    num_head_channels: int | None = None
    scaling_factor: float | None = None
    text_skip_layers: int | None = None
    schedule: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: Path) -> Hints:
        """Read the original SD inference config (e.g. v2-inference-v.yaml) next to a checkpoint."""
        import yaml

        try:
            params = (yaml.safe_load(path.read_text(encoding="utf-8")) or {})["model"]["params"]
            unet = (params.get("unet_config") or {}).get("params") or {}
            cond = (params.get("cond_stage_config") or {}).get("params") or {}
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not an SD inference config (model.params): {exc}") from None
        schedule = {ours: params[theirs] for ours, theirs in
                    (("beta_start", "linear_start"), ("beta_end", "linear_end"), ("num_train_timesteps", "timesteps"))
                    if theirs in params}
        layer = cond.get("layer")
        return cls(
            prediction_type={"v": "v_prediction", "eps": "epsilon", "x0": "sample"}.get(params.get("parameterization")),
            num_heads=unet.get("num_heads") if unet.get("num_heads", -1) != -1 else None,
            num_head_channels=unet.get("num_head_channels") if unet.get("num_head_channels", -1) != -1 else None,
            scaling_factor=params.get("scale_factor"),
            text_skip_layers={"last": 0, "penultimate": 1}.get(layer),
            schedule=schedule,
        )


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder lives in a single file: its key layout ("clip" | "clip_old" | "open_clip"), the
    prefix of its keys and, once inferred, its configuration."""

    layout: str
    prefix: str
    config: TextEncoderConfig | None = None


@dataclass
class SingleFileLayout:
    """What an SD single file holds, as configs for ldm's modules."""

    family: str                                   # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    texts: list[TextSlot]                         # the text encoders, in prompt order
    unet: dict                                    # diffusers UNet2DConditionModel config
    vae: dict                                     # diffusers AutoencoderKL config
    ema: bool                                     # LitEma copies of the U-Net weights are present
    schedule: dict = field(default_factory=dict)  # scheduler_config.json values the file's metadata gives
    defaults: dict = field(default_factory=dict)  # suggested sampling settings the file's metadata gives
    pipeline: dict = field(default_factory=dict)  # diffusers pipeline flags (SDXL: force_zeros_for_empty_prompt, ...)

    @property
    def text(self) -> TextEncoderConfig:
        return self.texts[0].config

    @property
    def text_layout(self) -> str:
        return self.texts[0].layout


class _Shapes:
    """Shape lookups under one prefix; a missing key is a CheckpointError naming the file."""

    def __init__(self, path, shapes: dict, prefix: str):
        self.path, self.prefix = path, prefix
        self.shapes = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}

    def __contains__(self, key):
        return key in self.shapes

    def __getitem__(self, key) -> tuple:
        if key not in self.shapes:
            raise CheckpointError(f"{self.path}: missing key {self.prefix + key} (needed to infer the model's "
                                  "configuration)")
        return self.shapes[key]

    def count(self, pattern: str) -> int:
        """How many consecutive n from 0 make ``pattern.format(n)`` a key."""
        n = 0
        while pattern.format(n) in self.shapes:
            n += 1
        return n


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _sdxl_slots(path, keys) -> tuple[str, list[TextSlot]]:
    if _has(keys, SDXL_BIG_G_PREFIX):
        clip = next((p for p in (SDXL_CLIP_PREFIX, SDXL_CLIP_PREFIX_BARE)
                     if p + "embeddings.token_embedding.weight" in keys), None)
        if clip is None:
            raise CheckpointError(f"{path}: SDXL file without its CLIP ViT-L text encoder: no "
                                  f"{SDXL_CLIP_PREFIX}embeddings.token_embedding.weight (it has bigG at "
                                  f"{SDXL_BIG_G_PREFIX}*)")
        return "sdxl", [TextSlot("clip", clip), TextSlot("open_clip", SDXL_BIG_G_PREFIX)]
    if _has(keys, SDXL_REFINER_PREFIX):
        return "sdxl_refiner", [TextSlot("open_clip", SDXL_REFINER_PREFIX)]
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(SDXL_PREFIX)})
    raise CheckpointError(f"{path}: SDXL file without its OpenCLIP ViT-bigG text encoder: no {SDXL_BIG_G_PREFIX}* "
                          f"(base) or {SDXL_REFINER_PREFIX}* (refiner) keys; conditioner keys found: {found}")


def _no_text_encoder(path, keys) -> CheckpointError:
    """The error for a file with a U-Net and no text encoder (a fine-tune that ships only the U-Net)."""
    if UNET_PREFIX + "label_emb.0.0.weight" in keys:
        want = (f"SDXL's text encoders: {SDXL_CLIP_PREFIX}* (CLIP ViT-L) and {SDXL_BIG_G_PREFIX}* (OpenCLIP "
                f"ViT-bigG), or {SDXL_REFINER_PREFIX}* (the refiner's bigG)")
    else:
        want = f"a text encoder: {CLIP_PREFIX}* (SD 1.x) or {OPEN_CLIP_PREFIX}* (SD 2.x)"
    parts = sorted({k.split(".")[0] for k in keys})
    return CheckpointError(f"{path}: the file holds a U-Net ({UNET_PREFIX}*) but no text encoder; missing {want}. "
                           f"Top-level keys found: {', '.join(parts)}. Load the full model it was fine-tuned from "
                           "and put this U-Net's weights into it")


def detect_family(path, keys) -> tuple[str, list[TextSlot]]:
    """(family, its text encoders' slots) from the key names; CheckpointError for anything else."""
    keys = set(keys)
    for prefix, name in OTHER_FAMILIES.items():
        if _has(keys, prefix):
            raise CheckpointError(f"{path}: not supported, this is {name} (found {prefix}* keys); ldm loads "
                                  "SD 1.x, SD 2.x and SDXL checkpoints")
    if not _has(keys, UNET_PREFIX):
        sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
        vae = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.layers."))
                  or (k.split(".")[0].isdigit() and ".conv.0." in k) for k in keys)   # + TAESD's halves
        hint = "; it looks like a VAE on its own: swap it in with --vae PATH / pipe.load_vae(PATH)" if vae else ""
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys "
                              f"(found: {sample}){hint}")
    if _has(keys, SDXL_PREFIX):
        return _sdxl_slots(path, keys)
    if not _has(keys, "cond_stage_model."):
        raise _no_text_encoder(path, keys)
    if _has(keys, UNET_PREFIX + "label_emb."):
        raise CheckpointError(f"{path}: not supported, this is {UNCLIP} (found {UNET_PREFIX}label_emb.* keys); ldm "
                              "loads SD 1.x, SD 2.x and SDXL checkpoints")
    if CLIP_PREFIX + "embeddings.token_embedding.weight" in keys:
        return "sd1", [TextSlot("clip", CLIP_PREFIX)]
    if CLIP_PREFIX_OLD + "embeddings.token_embedding.weight" in keys:
        return "sd1", [TextSlot("clip_old", CLIP_PREFIX_OLD)]
    if OPEN_CLIP_PREFIX + "token_embedding.weight" in keys:
        return "sd2", [TextSlot("open_clip", OPEN_CLIP_PREFIX)]
    found = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in keys if k.startswith("cond_stage_model.")})
    raise CheckpointError(f"{path}: unknown model family: no SD 1.x text encoder ({CLIP_PREFIX}*) and no SD 2.x "
                          f"OpenCLIP text encoder ({OPEN_CLIP_PREFIX}*); text keys found: {found or 'none'}")


def _depths(s: _Shapes, depth: list[int], cross: list[bool]):
    """transformer_layers_per_block: diffusers builds the middle block with the last level's value, so a plain
    last level (SDXL's refiner) carries the middle block's depth; one int when every attention level agrees."""
    mid = s.count("middle_block.1.transformer_blocks.{}.attn1.to_q.weight") or 1
    used = {d for d, c in zip(depth, cross) if c} | {mid}
    if len(used) == 1:
        return used.pop()
    return [*depth[:-1], depth[-1] if cross[-1] else mid]


def _added_embedding(path, s: _Shapes, family: str, pooled: int | None) -> dict:
    """SDXL's micro-conditioning config from label_emb's input width (see the module docstring)."""
    if "label_emb.0.0.weight" not in s:
        return {}
    width = s["label_emb.0.0.weight"][1]
    ids = SDXL_TIME_IDS.get(family)
    if ids is None or pooled is None or (width - pooled) % ids or width <= pooled:
        raise CheckpointError(f"{path}: unsupported U-Net: {UNET_PREFIX}label_emb.0.0.weight takes {width} features, "
                              f"not a pooled text embedding ({pooled}) plus {ids} time ids")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": (width - pooled) // ids,
            "projection_class_embeddings_input_dim": width}


def infer_unet(path, shapes: dict, family: str, hints: Hints, pooled: int | None = None) -> dict:
    """pooled: the width of the pooled text embedding an SDXL U-Net takes (bigG's projection)."""
    s = _Shapes(path, shapes, UNET_PREFIX)
    first = s["input_blocks.0.0.weight"]
    widths, layers, cross, depth = [], [], [], []
    k = 1
    while True:
        n = 0
        while f"input_blocks.{k + n}.0.in_layers.0.weight" in s:
            n += 1
        if n == 0:
            raise CheckpointError(f"{path}: missing key {UNET_PREFIX}input_blocks.{k}.0.in_layers.0.weight "
                                  "(needed to infer the U-Net's levels)")
        widths.append(s[f"input_blocks.{k}.0.out_layers.3.weight"][0])
        layers.append(n)
        cross.append(f"input_blocks.{k}.1.proj_in.weight" in s)
        depth.append(s.count(f"input_blocks.{k}.1.transformer_blocks.{{}}.attn1.to_q.weight") or 1)
        k += n
        if f"input_blocks.{k}.0.op.weight" not in s:
            break
        k += 1
    if "middle_block.1.proj_in.weight" not in s:
        raise CheckpointError(f"{path}: unsupported U-Net: its middle block has no cross-attention "
                              f"({UNET_PREFIX}middle_block.1.* missing)")
    attention = [k for k in s.shapes if k.endswith("attn2.to_k.weight")]
    if not attention:
        raise CheckpointError(f"{path}: unsupported U-Net: no cross-attention layers (attn2.to_k) found")
    if hints.num_heads:
        heads = hints.num_heads
    elif hints.num_head_channels or family != "sd1":
        heads = [w // (hints.num_head_channels or HEAD_CHANNELS) for w in widths]
    else:
        heads = SD1_HEADS
    v_model = hints.prediction_type == "v_prediction"

    def one(values):
        return values[0] if len(set(values)) == 1 else values

    sdxl = family.startswith("sdxl")
    return {
        # SD 2.x 768-v models sample at 96x96 latents; SDXL at 128x128; everything else at 64x64 (512 px). (The
        # yaml's image_size cannot tell: v2-inference-v.yaml says 64 for the 768 model.)
        "sample_size": SDXL_SAMPLE_SIZE if sdxl else 96 if family == "sd2" and v_model else 64,
        "in_channels": first[1],
        "out_channels": s["out.2.weight"][0],
        "block_out_channels": widths,
        "layers_per_block": one(layers),
        "down_block_types": [CROSS_DOWN if c else PLAIN_DOWN for c in cross],
        "up_block_types": [CROSS_UP if c else PLAIN_UP for c in reversed(cross)],
        "attention_head_dim": heads,
        "cross_attention_dim": s[attention[0]][1],
        "use_linear_projection": len(s["middle_block.1.proj_in.weight"]) == 2,
        "transformer_layers_per_block": _depths(s, depth, cross),
        # diffusers' SD 2.1 (768-v) config upcasts attention: in fp16 its softmax overflows otherwise.
        "upcast_attention": family == "sd2" and v_model,
        **_added_embedding(path, s, family, pooled),
        **_guidance_embedding(s),
    }


def _guidance_embedding(s: _Shapes) -> dict:
    """An LCM-distilled U-Net (LCM_Dreamshaper_v7 and its kind) projects the guidance's w-embedding into the time
    embedding: diffusers' ``time_embedding.cond_proj``, which the diffusers -> original converter
    (scripts/convert_diffusers_to_original_stable_diffusion.py) leaves under its diffusers name (no table renames
    it): ``model.diffusion_model.time_embedding.cond_proj.weight``, (time width, w-embedding width)."""
    key = "time_embedding.cond_proj.weight"
    return {"time_cond_proj_dim": s[key][1]} if key in s else {}


def infer_vae(path, shapes: dict, unet: dict, hints: Hints, family: str = "sd1") -> dict:
    s = _Shapes(path, shapes, VAE_PREFIX)
    levels = s.count("encoder.down.{}.block.0.conv1.weight")
    if levels == 0:
        raise CheckpointError(f"{path}: missing key {VAE_PREFIX}encoder.down.0.block.0.conv1.weight "
                              "(needed to infer the VAE)")
    return {
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "layers_per_block": s.count("encoder.down.0.block.{}.conv1.weight"),
        "latent_channels": s["decoder.conv_in.weight"][1],
        "sample_size": unet["sample_size"] * 2 ** (levels - 1),
        # SD's scale_factor (Rombach et al. 2022, §4.3.2); SDXL retrained the VAE and scales by 0.13025
        "scaling_factor": hints.scaling_factor or (SDXL_SCALING_FACTOR if family.startswith("sdxl") else 0.18215),
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
    }


def _open_clip_projection(s: _Shapes) -> int | None:
    if "text_projection" in s:
        return s["text_projection"][1]
    if OPEN_CLIP_PROJECTION[0] in s:                        # stored as a Linear (diffusers' conversion script)
        return s[OPEN_CLIP_PROJECTION[0]][0]
    return None


def infer_text(path, shapes: dict, family: str, slot: TextSlot, hints: Hints) -> TextEncoderConfig:
    """The text encoder in ``slot``. SDXL's encoders are built as transformers CLIP models (bigG with its
    projection), read at the penultimate layer without the final norm; SD 2.x's as the OpenCLIP tower."""
    sdxl = family.startswith("sdxl")
    s = _Shapes(path, shapes, slot.prefix)
    if slot.layout == "open_clip":
        vocab, width = s["token_embedding.weight"]
        layers = s.count("transformer.resblocks.{}.ln_1.weight")
        common = dict(vocab_size=vocab, hidden_size=width,
                      intermediate_size=s["transformer.resblocks.0.mlp.c_fc.weight"][0], num_hidden_layers=layers,
                      num_attention_heads=max(1, width // HEAD_CHANNELS),
                      max_position_embeddings=s["positional_embedding"][0], hidden_act="gelu",
                      projection_dim=_open_clip_projection(s))
        if sdxl:
            return TextEncoderConfig(**common, backend="transformers", family="sd2", skip_layers=1, final_norm=False,
                                     with_projection=True)
        return TextEncoderConfig(**common, backend="open_clip", family=family,
                                 skip_layers=1 if hints.text_skip_layers is None else hints.text_skip_layers)
    vocab, width = s["embeddings.token_embedding.weight"]
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=s.count("encoder.layers.{}.layer_norm1.weight"),
        num_attention_heads=max(1, width // HEAD_CHANNELS),
        max_position_embeddings=s["embeddings.position_embedding.weight"][0], hidden_act="quick_gelu",
        projection_dim=width, backend="transformers", family="sd1" if sdxl else family,
        skip_layers=1 if sdxl else hints.text_skip_layers or 0, final_norm=not sdxl)


def _metadata_json(path, metadata: dict, key: str):
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt {key} metadata ({exc})") from None


def has_ema(keys) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in keys)


def metadata_prediction_type(metadata: dict) -> str | None:
    """The prediction type other tools record in safetensors metadata: the Stability AI model spec
    (``modelspec.prediction_type``) or kohya-ss's trainer (``ss_v_parameterization``)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    return "v_prediction" if str(metadata.get("ss_v_parameterization", "")).lower() == "true" else None


TEXT_METADATA = ("ldm.text_encoder", "ldm.text_encoder_2")


def analyse(path, shapes: dict, metadata: dict, hints: Hints) -> SingleFileLayout:
    """Configs for ldm's modules from a file's shapes, metadata and hints (see the module docstring).
    The prediction type: hints (argument, yaml) first, then ldm's, the model spec's or kohya's metadata."""
    family, slots = detect_family(path, shapes)
    scheduler = _metadata_json(path, metadata, "ldm.scheduler") or {}
    hints.prediction_type = (hints.prediction_type or scheduler.get("prediction_type")
                             or metadata_prediction_type(metadata))
    texts = []
    for slot, key in zip(slots, TEXT_METADATA):
        text = _metadata_json(path, metadata, key)
        try:
            config = TextEncoderConfig.from_dict(text) if text else infer_text(path, shapes, family, slot, hints)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: text encoder configuration: {exc}") from None
        texts.append(dataclasses.replace(slot, config=config))
    pooled = texts[-1].config.projection_dim if texts[-1].config.with_projection else None
    unet = _metadata_json(path, metadata, "ldm.unet") or infer_unet(path, shapes, family, hints, pooled)
    vae = _metadata_json(path, metadata, "ldm.vae") or infer_vae(path, shapes, unet, hints, family)
    schedule = {**scheduler, **hints.schedule}
    if hints.prediction_type:
        schedule["prediction_type"] = hints.prediction_type
    defaults = _metadata_json(path, metadata, "ldm.defaults") or {}
    pipeline = _metadata_json(path, metadata, "ldm.pipeline") or SDXL_PIPELINE_FLAGS.get(family, {})
    return SingleFileLayout(family, texts, unet, vae, has_ema(shapes), schedule, defaults, pipeline)


def sidecar_hints(path: Path) -> Hints:
    """Hints from ``<name>.yaml`` next to the file, if there is one."""
    yaml_path = path.with_suffix(".yaml")
    return Hints.from_yaml(yaml_path) if yaml_path.is_file() else Hints()

