"""The data path of DESIGN.md, top to bottom, and what a user does with it.

    from ldm.pipeline import Pipeline       # also ``from ldm import Pipeline``

  core           ``Pipeline``: prompt -> text encoder -> guided sampler over the U-Net -> VAE decode -> images
  control        ``Control``: ControlNets and T2I-Adapters steering a request (``pipe.load_control``)
  applications   img2img, inpaint, denoise, anomaly, upscale (a mixin of Pipeline)
  memory         what a request will need, estimated before anything is allocated
  images         images and masks in and out: paths / PIL / arrays <-> tensors
  png_info       the generation settings stored in every PNG (ldm JSON + A1111 infotext)
  vae_swap       ``pipe.load_vae``: another VAE or TAESD in the model's place; cheap live previews
  visualize      the forward/reverse diffusion figure

Imports: ``ldm.models``, ``ldm.checkpoints``, the diffusion math and ``ldm.files``; never ``train``, ``batch``
or ``cli``.
"""

from ldm.pipeline.control import Control
from ldm.pipeline.core import DefaultModelMissing, Pipeline, Request, load_pipeline
from ldm.pipeline.png_info import GenerationInfo, read_png_info, save_png

__all__ = ["Pipeline", "Control", "Request", "load_pipeline", "DefaultModelMissing", "GenerationInfo", "read_png_info",
           "save_png"]
