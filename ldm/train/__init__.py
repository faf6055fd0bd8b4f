"""Training and fine-tuning (full or LoRA) on captioned images, on one CPU, one GPU or many, with Accelerate.

    ldm train --data DIR --output DIR [--init MODEL] [--lora RANK] ...
    accelerate launch --multi_gpu --num_processes 2 -m ldm.train --data DIR --output DIR ...

  loop           the Accelerate loop (``Trainer``), the ``ldm train`` flags and ``python -m ldm.train``
  config         ``TrainConfig``: typed, from YAML presets plus KEY=VALUE overrides
  build          networks and model folders: configs from the training config, initial weights, exports
  stages         what one step trains: the VAE, or the U-Net (+ text encoder or LoRA), and sampling previews
  checkpoint     training checkpoints: atomic step folders, RNG state, resume
  data           captioned-image folders, deterministic data order and augmentation
  latent_cache   VAE latents computed once and reused across epochs
  ema            the exponential moving average of the weights

Imports: ``ldm.pipeline`` (previews), ``ldm.checkpoints``, ``ldm.models`` and the math; never ``batch`` or ``cli``.
"""

from ldm.train.config import ConfigError, TrainConfig, load_config
from ldm.train.loop import Trainer, add_arguments, run, train_main

__all__ = ["Trainer", "TrainConfig", "ConfigError", "load_config", "add_arguments", "run", "train_main"]
