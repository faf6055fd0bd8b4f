"""The cross-attention U-Net of the Stable Diffusion family (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"; the U-Net itself after Ronneberger et al. 2015 and the DDPM variant of
Ho et al. 2020).

Parameter names and shapes are those of diffusers' UNet2DConditionModel for the same config
(diffusers/models/unets/unet_2d_condition.py), so a diffusers `unet/` folder loads with strict=True.
One quirk carries over on purpose: in diffusers configs `attention_head_dim` is the *number of heads* unless
`num_attention_heads` is set (diffusers issue #2011). SD 1.x: attention_head_dim=8 -> 8 heads of C/8 channels;
SD 2.x: attention_head_dim=[5, 10, 20, 20] -> 5..20 heads of 64 channels.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis") adds
*micro-conditioning* (``addition_embed_type="text_time"``): the pooled text embedding and the image's size and
crop numbers (``time_ids``: original height/width, crop top/left, target height/width; the refiner puts an
aesthetic score in place of the target size) are embedded (each time id sinusoidally, like a timestep) and
added to the timestep embedding. Its other changes are config values this U-Net already takes: three levels,
no attention at the first, 1/2/10 transformer layers per level, linear projections, 2048-wide context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import Attention, Transformer2D, check_backend
from ldm.models.blocks import DownStage, MidStage, TimestepEmbedding, UpStage, timestep_embedding
from ldm.models.checkpointing import set_gradient_checkpointing
from ldm.models.conv import Conv2d, inference_layout

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

IntOrList = int | tuple[int, ...]

# diffusers UNet2DConditionModel keys we do not model, with the value(s) under which they change nothing.
# A config that sets one of them to anything else describes an architecture we do not build -> ValueError.
_NEUTRAL_KEYS: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that never change the architecture (addition_embed_type_num_heads only matters with other embed types).
_IGNORED_KEYS = {"addition_embed_type_num_heads"}
ADDITION_EMBED_TYPES = (None, "text_time")


def _tuple(value):
    """JSON lists -> tuples, so configs compare and hash the same however they were made."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass
class UNetConfig:
    """Field names and meanings = diffusers UNet2DConditionModel config.json keys (the SD subset).
    Defaults are Stable Diffusion 1.x's U-Net. Per-level fields take one int or one value per level."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrList = 2
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    attention_head_dim: IntOrList = 8
    num_attention_heads: IntOrList | None = None
    cross_attention_dim: IntOrList = 768
    use_linear_projection: bool = False
    transformer_layers_per_block: IntOrList = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False
    mid_block_type: str = CROSS_MID
    dropout: float = 0.0
    addition_embed_type: str | None = None               # "text_time": SDXL's micro-conditioning
    addition_time_embed_dim: int | None = None           # sinusoidal features per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + time ids × that (SDXL: 2816)
    time_cond_proj_dim: int | None = None                 # LCM-distilled U-Nets: the guidance's w-embedding width

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _tuple(getattr(self, f.name)))
        self.validate()

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, name: str) -> tuple:
        """A per-level field as one value per level (down-path order)."""
        value = getattr(self, name)
        if isinstance(value, tuple):
            return value
        return (value,) * self.levels

    def heads(self) -> tuple[int, ...]:
        """Attention heads per level, resolving diffusers' naming quirk (see the module docstring)."""
        return self.per_level("num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim")

    def validate(self) -> None:
        n = self.levels
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                                 f"block_out_channels has {n}")
        for name in ("layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                     "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"UNetConfig.{name}={list(value)} needs one entry per level ({n})")
            if isinstance(value, tuple) and not all(isinstance(v, int) for v in value):
                raise ValueError(f"UNetConfig.{name}={list(value)}: nested per-layer lists are not supported")
        allowed = {"down_block_types": (CROSS_DOWN, PLAIN_DOWN), "up_block_types": (CROSS_UP, PLAIN_UP)}
        for name, ok in allowed.items():
            bad = [b for b in getattr(self, name) if b not in ok]
            if bad:
                raise ValueError(f"UNetConfig.{name}: unsupported block type(s) {bad}; supported: {list(ok)}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r} is not supported; "
                             f"supported: {list(ADDITION_EMBED_TYPES)}")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.mid_block_type != CROSS_MID:
            raise ValueError(f"UNetConfig.mid_block_type={self.mid_block_type!r} is not supported; "
                             f"only {CROSS_MID!r}")
        for channels, heads in zip(self.block_out_channels, self.heads()):
            if channels % heads:
                raise ValueError(f"UNetConfig: {channels} channels do not split into {heads} attention heads")
            if channels % self.norm_num_groups:
                raise ValueError(f"UNetConfig.norm_num_groups={self.norm_num_groups} does not divide {channels}")

    def spatial_transformer(self, level: int):
        """The attention that follows each resnet of a level, as a function of its channels (shared by the U-Net
        and its ControlNet copy). No dropout inside: diffusers applies the config's dropout to the resnets only."""
        heads, context_dims = self.heads(), self.per_level("cross_attention_dim")
        depths = self.per_level("transformer_layers_per_block")

        def build(c: int) -> Transformer2D:
            return Transformer2D(c, heads[level], c // heads[level], context_dims[level], depth=depths[level],
                                 groups=self.norm_num_groups, linear=self.use_linear_projection,
                                 upcast=self.upcast_attention)
        return build

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from a diffusers config.json dict. "_"-prefixed keys and keys at their neutral values are
        ignored; keys that would ask for an architecture we do not build raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in names:
                kwargs[key] = value
            elif key in _NEUTRAL_KEYS:
                values = value if isinstance(value, (list, tuple)) else [value]
                if any(v not in _NEUTRAL_KEYS[key] for v in values):
                    unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if unsupported:
            raise ValueError("UNet config asks for features ldm's UNet does not support: " + ", ".join(unsupported))
        if unknown:
            raise ValueError(f"UNet config has unknown key(s): {', '.join(sorted(unknown))}")
        if kwargs.get("sample_size") is None:
            kwargs.pop("sample_size", None)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A diffusers config dict; UNet2DConditionModel(**d) builds the same architecture. diffusers refuses
        `num_attention_heads`, so the head counts are written as `attention_head_dim` (its quirk)."""
        d = dataclasses.asdict(self)
        d["attention_head_dim"] = self.num_attention_heads if self.num_attention_heads is not None \
            else self.attention_head_dim
        d["num_attention_heads"] = None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def micro_conditioned(cfg: UNetConfig, add_embedding: nn.Module, emb: torch.Tensor, text_embeds: torch.Tensor,
                      time_ids: torch.Tensor) -> torch.Tensor:
    """emb + SDXL's micro-conditioning: [pooled text ‖ sinusoids of each time id] through ``add_embedding`` (the
    U-Net's and its ControlNet copy's)."""
    b = emb.shape[0]
    sinusoids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    features = torch.cat([text_embeds.reshape(b, -1).to(emb.dtype), sinusoids.reshape(b, -1).to(emb.dtype)], -1)
    return emb + add_embedding(features)


class UNet(nn.Module):
    """ε/v-prediction network: forward(x, t, context) -> tensor shaped like x (out_channels)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        channels = cfg.block_out_channels
        layers = cfg.per_level("layers_per_block")
        temb = channels[0] * 4
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)
        spatial_transformer = cfg.spatial_transformer

        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, cond_dim=cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":   # SDXL: [pooled text ‖ sinusoids of the time ids] -> MLP
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownStage(
                prev, channels[i], temb, layers[i], downsample=i < cfg.levels - 1,
                attention=spatial_transformer(i) if kind == CROSS_DOWN else None, **common))
            prev = channels[i]

        self.mid_block = MidStage(channels[-1], temb, attention=spatial_transformer(cfg.levels - 1), **common)

        # Up level i mirrors down level n-1-i with one resnet more; the skips it consumes are that level's
        # resnet outputs and, last, the previous level's downsampled map (or conv_in's output at level 0).
        self.up_blocks = nn.ModuleList()
        rev = cfg.levels - 1
        for i, kind in enumerate(cfg.up_block_types):
            level = rev - i
            out = channels[level]
            skip_last = channels[max(level - 1, 0)]
            n = layers[level] + 1
            self.up_blocks.append(UpStage(
                prev, out, temb, n, skip_channels=[out] * (n - 1) + [skip_last], upsample=i < rev,
                attention=spatial_transformer(level) if kind == CROSS_UP else None, **common))
            prev = out

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        # a Linear's weight: reading a conv's would unpack it on a lean pipeline (ldm/models/conv.py)
        return self.time_embedding.linear_1.weight.dtype

    def _added(self, emb: torch.Tensor, text_embeds, time_ids) -> torch.Tensor:
        """SDXL's micro-conditioning (see the module docstring) added to the timestep embedding."""
        cfg = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
        return micro_conditioned(cfg, self.add_embedding, emb, text_embeds, time_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w) latents, t (B,) or scalar timesteps (fractional allowed), context (B, L, D); SDXL also
        text_embeds (B, pooled) and time_ids (B, 6 | 5). Control residuals, as diffusers names them
        (ldm.models.controlnet, ldm.models.t2i_adapter): a ControlNet's are added to every skip and to the
        middle block's output; a T2I-Adapter's features one per down level, inside it (after its last layer, or
        after a plain level's downsampler) and, when one is left and fits, after the middle block (SDXL).
        ``timestep_cond`` (B, time_cond_proj_dim): an LCM-distilled U-Net's guidance embedding
        (ldm.guidance.guidance_embedding), projected and added to the timestep features."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet: t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype), None if timestep_cond is None else timestep_cond.to(x.dtype))
        if cfg.addition_embed_type == "text_time":
            emb = self._added(emb, text_embeds, time_ids)
        context = context.to(x.dtype)

        h = self.conv_in(inference_layout(x))
        skips = [h]
        features = list(down_intrablock_additional_residuals or ())
        for block in self.down_blocks:
            feature = features.pop(0) if features else None
            inside = feature is not None and block.attentions is not None
            h, block_skips = block(h, emb, context, feature if inside else None)
            if feature is not None and not inside:
                h = block_skips[-1] = h + feature
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        h = self.mid_block(h, emb, context)
        if features and features[0].shape == h.shape:
            h = h + features.pop(0)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, so inputs whose sides are not multiples of 2^levels still work.
            size = skips[-1].shape[-2:] if block.upsamplers is not None else None
            h = block(h, mine, emb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled())).contiguous()

    def set_attention_backend(self, name: str = "sdpa", slice_size: int | None = None) -> None:
        """"sdpa" (default), "xformers" (needs the extra), or "sliced" (slice_size (batch·head) pairs at a time;
        None -> one sample's heads at a time)."""
        check_backend(name, slice_size)
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend, module.slice_size = name, slice_size

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute resnet and transformer-block activations in the backward pass (non-reentrant)."""
        set_gradient_checkpointing(self, enabled)
