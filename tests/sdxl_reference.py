"""An SDXL diffusers folder -> the released single-file layout, written the way diffusers' own
``scripts/convert_diffusers_to_original_sdxl.py`` (github.com/huggingface/diffusers) writes it: an independent
reference for ldm's key tables, re-expressed here as ordered (diffusers, original) substring replacements.

    tensors = convert_folder(folder)                          # {"model.diffusion_model.input_blocks.0.0.weight": ...}

Like the script it assumes SDXL base's structure: 3 U-Net levels of 2 resnets (attention at levels 1 and 2), a
4-level VAE (2 resnets down, 3 up), CLIP ViT-L and OpenCLIP ViT-bigG. Two things it does that the released
files do not: CLIP-L is written with whatever prefix transformers saved (transformers 5: no ``text_model.``),
and bigG's projection stays a Linear (``text_projection.weight``); ``released_projection=True`` stores it as the
released files do (``text_projection``, transposed).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

UNET_FIXED = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
              ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
              ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_layers() -> list[tuple[str, str]]:
    """The script's block renames, in its order (sequential index 3·level + j for 2 resnets a level)."""
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i > 0:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i < 2:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs.append(("output_blocks.2.1.conv.", "output_blocks.2.2.conv."))   # up level 0 has attention too
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


def _replace_all(key: str, pairs) -> str:
    for ours, theirs in pairs:
        key = key.replace(ours, theirs)
    return key


def unet_to_original(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = _replace_all(key, UNET_FIXED) if not key.startswith(("down_", "up_", "mid_")) else key
        if "resnets" in key:
            name = _replace_all(name, UNET_RESNET)
        out["model.diffusion_model." + _replace_all(name, _unet_layers())] = value
    return out


def _vae_pairs() -> list[tuple[str, str]]:
    pairs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
             ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            pairs += [(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                      (f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample.")]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    return pairs + [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]


VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]


def vae_to_original(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = _replace_all(key, _vae_pairs())
        if "attentions" in key:
            name = _replace_all(name, VAE_ATTENTION)
            if name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)          # the original VAE attends with 1x1 convolutions
        out["first_stage_model." + name] = value
    return out


_OPEN_CLIP = {"text_model.encoder.layers.": "transformer.resblocks.", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              ".fc1.": ".c_fc.", ".fc2.": ".c_proj.", ".self_attn": ".attn",
              "text_model.final_layer_norm.": "ln_final.",
              "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding"}
_OPEN_CLIP_RE = re.compile("|".join(re.escape(k) for k in _OPEN_CLIP))
_QKV = re.compile(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)")


def bigg_to_open_clip(state: dict, released_projection: bool = False) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP names; q, k, v fused into in_proj in that order."""
    out, fused = {}, {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match:
            fused.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
            continue
        out[_OPEN_CLIP_RE.sub(lambda m: _OPEN_CLIP[m.group(0)], key)] = value
    for (layer, param), parts in fused.items():
        name = _OPEN_CLIP_RE.sub(lambda m: _OPEN_CLIP[m.group(0)], layer)
        out[f"{name}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if released_projection:
        out["text_projection"] = out.pop("text_projection.weight").t().contiguous()
    return out


def convert_folder(folder, released_projection: bool = False, half: bool = False) -> dict:
    """The single-file tensors of an SDXL base diffusers folder (safetensors weights)."""
    folder = Path(folder)

    def read(name: str) -> dict:                 # one file, or the shards save_pretrained splits a large model into
        return {k: v for f in sorted((folder / name).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    tensors = {**unet_to_original(read("unet")), **vae_to_original(read("vae"))}
    tensors.update({"conditioner.embedders.0.transformer." + k: v for k, v in read("text_encoder").items()})
    bigg = bigg_to_open_clip(read("text_encoder_2"), released_projection)
    tensors.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.items()})
    return {k: v.half() for k, v in tensors.items()} if half else tensors


# The released architectures, as the config.json files of stabilityai/stable-diffusion-xl-base-1.0 and
# stable-diffusion-xl-refiner-1.0 give them (only the keys that differ from the diffusers defaults ldm also uses).
SDXL_TIME = dict(addition_embed_type="text_time", addition_time_embed_dim=256, use_linear_projection=True,
                 sample_size=128, layers_per_block=2)
SDXL_BASE_UNET = dict(**SDXL_TIME, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                      cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
                      projection_class_embeddings_input_dim=2816,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
SDXL_REFINER_UNET = dict(**SDXL_TIME, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                         cross_attention_dim=1280, transformer_layers_per_block=4,
                         projection_class_embeddings_input_dim=2560,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)
# transformers CLIPTextConfig values of text_encoder (OpenAI CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
