"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder half (conv_in, the down levels, the middle block) that also sees a
control image: a small convolutional network (the *hint embedding*, §3.2: 4×4-strided convolutions to the
latent size) adds its features to conv_in's output. Every map the copy would hand to the U-Net's up path as a
skip, and the middle block's output, goes through a 1×1 *zero convolution* (initialised to zero, so training
starts from the unchanged U-Net); the results are added to the locked U-Net's skips and middle output
(``UNet.forward(..., down_block_additional_residuals=, mid_block_additional_residual=)``).

Built from the U-Net's own blocks, with diffusers' ControlNetModel parameter names
(diffusers/models/controlnets/controlnet.py), so a diffusers ``controlnet/`` folder loads with strict=True and
the copy's keys equal the U-Net's (a "difference" file adds the base U-Net's weights key by key).
SDXL's ControlNets carry the micro-conditioning embedding (``add_embedding``) as the SDXL U-Net does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.blocks import DownStage, MidStage, TimestepEmbedding, timestep_embedding
from ldm.models.conv import Conv2d, inference_layout
from ldm.models.unet import CROSS_DOWN, CROSS_UP, PLAIN_UP, UNetConfig, micro_conditioned

# diffusers ControlNetModel config keys that are not U-Net keys, with their defaults.
CONTROL_DEFAULTS = {
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
# What ``ControlNet.from_unet`` copies from the U-Net (diffusers' ControlNetModel.from_unet: conv_in, the time and
# added embeddings, the down blocks and the middle block); everything else starts at zero or at random.
COPIED = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
# U-Net config keys a ControlNet config never has (it has no decoder half); filled from the encoder's.
_DECODER_KEYS = ("up_block_types", "out_channels")
# U-Net config keys diffusers' ControlNetModel does not take (time_cond_proj_dim: LCM's, which has no ControlNet)
_NOT_CONTROLNET = ("sample_size", "dropout", "time_cond_proj_dim")


@dataclass
class ControlNetConfig:
    """diffusers ControlNetModel config.json: the encoder's architecture as a UNetConfig (same keys, same
    validation) plus the control image's hint embedding."""

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("ControlNetConfig.controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.controlnet_conditioning_channel_order!r}")

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        """From a diffusers ControlNetModel config dict; unsupported features raise ValueError naming them."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        control = {k: d.pop(k) for k in list(d) if k in CONTROL_DEFAULTS}
        down = d.get("down_block_types", UNetConfig.down_block_types)
        d.setdefault("up_block_types", [CROSS_UP if b == CROSS_DOWN else PLAIN_UP for b in reversed(down)])
        return cls(UNetConfig.from_dict(d), **control)

    def to_dict(self) -> dict:
        """A diffusers config dict: ControlNetModel(**d) builds the same architecture."""
        d = {k: v for k, v in self.unet.to_dict().items() if k not in (*_DECODER_KEYS, *_NOT_CONTROLNET)}
        for key in CONTROL_DEFAULTS:
            value = getattr(self, key)
            d[key] = list(value) if isinstance(value, tuple) else value
        return d


class ConditioningEmbedding(nn.Module):
    """The hint embedding (Zhang et al. 2023, §3.2): conv_in, then per width a 3×3 conv and a stride-2 3×3 conv
    to the next width, SiLU after each, and a (zero-initialised) conv_out to the U-Net's first width: a control
    image at pixel size becomes a map at latent size (3 halvings: 8×)."""

    def __init__(self, out_channels: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(Conv2d(a, a, 3, padding=1))
            self.blocks.append(Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()
        h = F.silu(self.conv_in(x), inplace=inplace)
        for conv in self.blocks:
            h = F.silu(conv(h), inplace=inplace)
        return self.conv_out(h)


class ControlNet(nn.Module):
    """forward(x, t, context, hint) -> (residuals for the U-Net's skips, residual for its middle output)."""

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        self.config = config or ControlNetConfig()
        cfg = self.config.unet
        channels = cfg.block_out_channels
        layers = cfg.per_level("layers_per_block")
        temb = channels[0] * 4
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        spatial_transformer = cfg.spatial_transformer

        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            channels[0], self.config.conditioning_channels, self.config.conditioning_embedding_out_channels)

        # one zero conv per skip the U-Net's up path takes: conv_in's map, each resnet's, each downsampler's
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([Conv2d(channels[0], channels[0], 1)])
        prev = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == cfg.levels - 1
            self.down_blocks.append(DownStage(
                prev, channels[i], temb, layers[i], downsample=not last,
                attention=spatial_transformer(i) if kind == CROSS_DOWN else None, **common))
            for _ in range(layers[i] + (0 if last else 1)):
                self.controlnet_down_blocks.append(Conv2d(channels[i], channels[i], 1))
            prev = channels[i]
        self.mid_block = MidStage(channels[-1], temb, attention=spatial_transformer(cfg.levels - 1), **common)
        self.controlnet_mid_block = Conv2d(channels[-1], channels[-1], 1)

    @classmethod
    def from_unet(cls, unet: nn.Module, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple[int, ...] | None = None,
                  latent_factor: int = 8) -> ControlNet:
        """A ControlNet to train for ``unet``, as diffusers' ``ControlNetModel.from_unet`` makes it (Zhang et al.
        2023, §3): the encoder half copied from the U-Net, the zero convolutions and the hint embedding's conv_out
        at zero, so that before training the U-Net's output is unchanged. ``conditioning_embedding_out_channels``:
        the hint embedding's widths, one halving between each two; by default diffusers' (16, 32, 96, 256) cut to
        the VAE's ``latent_factor`` (SD's 8: all four; ldm's default model's 4: (16, 32, 96))."""
        if conditioning_embedding_out_channels is None:
            halvings = int(math.log2(latent_factor))
            if 2 ** halvings != latent_factor or not 1 <= halvings <= 3:
                raise ValueError(f"ControlNet.from_unet: latent_factor={latent_factor} is not 2, 4 or 8; give "
                                 "conditioning_embedding_out_channels (one more width than halvings)")
            conditioning_embedding_out_channels = CONTROL_DEFAULTS["conditioning_embedding_out_channels"][:halvings + 1]
        config = ControlNetConfig(copy.deepcopy(unet.config), conditioning_channels,
                                  tuple(conditioning_embedding_out_channels))
        if config.unet.time_cond_proj_dim:
            raise ValueError("ControlNet.from_unet: a U-Net with time_cond_proj_dim (LCM-distilled) has no ControlNet "
                             "layout in diffusers")
        model = cls(config).to(device=unet.time_embedding.linear_1.weight.device, dtype=unet.dtype)
        copied = {k: v.detach().clone() for k, v in unet.state_dict().items() if k.startswith(COPIED)}
        missing, unexpected = model.load_state_dict(copied, strict=False)
        if unexpected or any(k.startswith(COPIED) for k in missing):
            raise ValueError(f"ControlNet.from_unet: the U-Net's encoder does not match its copy (unexpected "
                             f"{unexpected[:3]}, missing {[k for k in missing if k.startswith(COPIED)][:3]})")
        with torch.no_grad():
            for zero in (*model.controlnet_down_blocks, model.controlnet_mid_block,
                         model.controlnet_cond_embedding.conv_out):
                zero.weight.zero_()
                zero.bias.zero_()
        return model

    @property
    def dtype(self) -> torch.dtype:
        # a Linear's weight: reading a conv's would unpack it on a lean model (ldm/models/conv.py)
        return self.time_embedding.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embedding.linear_1.weight.device

    def embedding(self, x: torch.Tensor, t: torch.Tensor, text_embeds=None, time_ids=None) -> torch.Tensor:
        """The timestep embedding (+ SDXL's micro-conditioning), as the U-Net computes it."""
        cfg = self.config.unet
        emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))
        if cfg.addition_embed_type != "text_time":
            return emb
        if text_embeds is None or time_ids is None:
            raise ValueError("this ControlNet (SDXL) needs text_embeds and time_ids")
        return micro_conditioned(cfg, self.add_embedding, emb, text_embeds, time_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, hint: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, C, h, w) latents as the U-Net gets them, t (B,) or scalar, context (B, L, D), hint (B, 3, 8h, 8w)
        in [0, 1]. Unscaled residuals: the caller multiplies by the unit's weight."""
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.embedding(x, t, text_embeds, time_ids)
        context = context.to(x.dtype)
        hint = hint.to(x.dtype)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            hint = hint.flip(1)
        h = self.conv_in(inference_layout(x)) + self.controlnet_cond_embedding(inference_layout(hint))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, emb, context)
        down = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h)
        if self.config.global_pool_conditions:   # "shuffle"-style ControlNets: only the global mean acts
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
