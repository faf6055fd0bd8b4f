"""SD-family networks: the cross-attention U-Net, the KL autoencoder, and their attention layers."""

from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["UNet", "UNetConfig", "AutoencoderKL", "VAEConfig", "DiagonalGaussian"]
