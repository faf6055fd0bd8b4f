"""What a loaded model is made of: the three networks, the training noise schedule, its facts and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm.checkpoints.info import ModelInfo
from ldm.models.text import TextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.schedules import ScheduleConfig


@dataclass
class Components:
    """Everything a Pipeline needs: the three networks, the training noise schedule and suggested defaults."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: ScheduleConfig
    info: ModelInfo
    defaults: dict = field(default_factory=dict)
