"""SD-family networks, as plain ``nn.Module``s whose state-dict keys are diffusers' own.

  unet           the cross-attention U-Net (SD 1.x / 2.x) and its typed config
  blocks         ResNet blocks, down/up/mid stages, the timestep embedding
  attention      self/cross attention, transformer blocks; backends sdpa (default), sliced, xformers
  conv           the convolution with a CPU-prepacked weight (lean inference), token <-> feature-map reshapes
  vae            the KL autoencoder (encode/decode, tiling)
  taesd          the tiny autoencoder TAESD / TAESDXL (diffusers' AutoencoderTiny)
  text           the CLIP text encoder (transformers CLIP or OpenCLIP weights) behind one interface
  tokenizer      the bundled CLIP BPE tokenizer and 77-token encoding
  checkpointing  gradient checkpointing for any block
  controlnet     ControlNet (a copy of the U-Net's encoder + zero convs); t2i_adapter: the T2I-Adapter
  ip_adapter     IP-Adapter's image projections and decoupled cross-attention

Imports: torch, transformers/open_clip (text encoders), ``ldm.assets`` and the diffusion math only; never
``checkpoints``, ``pipeline``, ``train``, ``batch`` or ``cli`` (a test checks this).
"""

from ldm.models.unet import UNet, UNetConfig
from ldm.models.taesd import AutoencoderTiny, TinyVAEConfig
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "DiagonalGaussian", "AutoencoderTiny", "TinyVAEConfig"]
