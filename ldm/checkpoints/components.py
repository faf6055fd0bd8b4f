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
    """Everything a Pipeline needs: the networks, the training noise schedule and suggested defaults.

    ``text_encoder`` is the first (or only) encoder a prompt goes through; SDXL's base adds OpenCLIP bigG as
    ``text_encoder_2`` (its refiner has bigG alone, as ``text_encoder``). ``pipeline_config`` holds the
    diffusers pipeline flags that change what the networks are given (``force_zeros_for_empty_prompt``,
    ``requires_aesthetics_score``)."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: ScheduleConfig
    info: ModelInfo
    defaults: dict = field(default_factory=dict)
    text_encoder_2: TextEncoder | None = None
    pipeline_config: dict = field(default_factory=dict)

    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]

    @property
    def modules(self) -> list:
        return [self.unet, self.vae, *self.text_encoders]
