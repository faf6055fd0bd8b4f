"""Model files in and out: SD single files (.safetensors / .ckpt) and diffusers folders, read strictly and
offline, and written so that diffusers and the SD tools read them back.

    components = load("v1-5-pruned-emaonly.safetensors")       # or a diffusers / ldm folder
    save_diffusers(components, "out/model")                     # StableDiffusionPipeline.from_pretrained loads it
    save_single_file(components, "out/model.safetensors")       # the original SD layout; load() reads it back
    print(describe("model.safetensors"))                        # what `ldm info` prints

What lives here, one concept a module:
  loading      ``load`` and ``describe``: strict matching of a file's tensors to the networks
  saving       ``save_diffusers`` and ``save_single_file``
  components   ``Components``: what a loaded model is made of
  infer        a single file's family and configs, inferred from its tensors' shapes (+ sidecar hints)
  keys         the original SD key names <-> ours, as tables of data
  tensor_io    safe tensor I/O (safetensors; pickles only through ``torch.load(weights_only=True)``)
  vae_files    VAE files and folders on their own (SD/SDXL VAEs, TAESD), for ``Pipeline.load_vae``
  info         ``ModelInfo``: what ``ldm info`` prints
  lora         LoRA adapters: the layers, ldm's file format, applying and removing them
  control      ControlNet / T2I-Adapter files (kind, layout and config from the keys; tables in control_keys);
               ip_adapter: IP-Adapter files and their CLIP image encoders
  library/     names instead of paths: Hugging Face repo ids from the local cache, A1111 / ComfyUI / ldm models
               folders (by name, title or short hash), A1111's hashes and their cache

Imports: ``ldm.models``, the diffusion math and ``ldm.files``; never ``pipeline``, ``train``, ``batch`` or ``cli``.
"""

from ldm.checkpoints.components import Components
from ldm.checkpoints.info import ModelInfo
from ldm.checkpoints.loading import describe, load
from ldm.checkpoints.saving import save_diffusers, save_single_file, sd_state_dict
from ldm.checkpoints.tensor_io import CheckpointError

__all__ = ["Components", "ModelInfo", "CheckpointError", "load", "describe", "save_diffusers", "save_single_file",
           "sd_state_dict"]
