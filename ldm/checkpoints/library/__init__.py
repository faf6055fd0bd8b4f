"""The model library: names instead of paths (docs/models.md).

    Library("~/stable-diffusion-webui").find("lora", "style").path       # an A1111 / ComfyUI / ldm models folder
    resolve_model("stabilityai/stable-diffusion-xl-base-1.0")             # a repo id in the local HF cache, offline
    resolve_model("sd15", open_library("~/ComfyUI"))                      # a checkpoint of the library

  index      the models folder: entries by kind (checkpoint, lora, vae, controlnet, embedding), their names,
             families (from headers) and lookup by name, A1111 title or short hash
  hf_cache   Hugging Face repo ids -> snapshot folders of the local cache, through huggingface_hub, offline
  hashes     A1111's short hashes (model, LoRA) and their cache on disk
  names      a name or a path -> the file: the one rule every loader and command applies
"""

from ldm.checkpoints.library.hashes import HashCache, lora_hash, weights_hash
from ldm.checkpoints.library.hf_cache import ModelNotCached, cached_snapshot, is_repo_id
from ldm.checkpoints.library.index import ENV, KINDS, Entry, Library, LibraryError
from ldm.checkpoints.library.names import open_library, resolve_file, resolve_model

__all__ = ["ENV", "KINDS", "Entry", "HashCache", "Library", "LibraryError", "ModelNotCached", "cached_snapshot",
           "is_repo_id", "lora_hash", "open_library", "resolve_file", "resolve_model", "weights_hash"]
