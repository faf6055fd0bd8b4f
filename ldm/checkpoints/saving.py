"""Saving SD-family models: diffusers pipeline folders and SD single files, both readable by ``load`` and by
the tools people use (diffusers, A1111, ComfyUI). Every file is written atomically (``ldm.files``).

    save_diffusers(components, "out/model")                     # StableDiffusionPipeline.from_pretrained loads it
    save_single_file(components, "out/model.safetensors")       # the original SD layout; load() reads it back
"""

from __future__ import annotations

import copy
import json
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ldm.checkpoints.components import Components
from ldm.checkpoints.keys import convert_text, scatter, text_keymaps, unet_keymaps, vae_keymaps
from ldm.checkpoints.loading import DEFAULTS_FILE
from ldm.checkpoints.tensor_io import write_json, write_safetensors
from ldm.models.text import TextEncoder, TextEncoderConfig
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL


def _diffusers_version() -> str:
    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"


def _write_bpe_files(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt from a tokenizers-backed tokenizer (transformers 5 saves only tokenizer.json;
    transformers 4's CLIPTokenizer, which diffusers folders name, reads these two)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _save_tokenizer(text_encoder: TextEncoder, folder: Path) -> None:
    """The tokenizer files, written to a temporary folder and moved in file by file. The saved tokenizer
    pads as ours does (SD 2.x: with "!", as diffusers' SD 2 tokenizers do)."""
    tokenizer = copy.deepcopy(text_encoder.tokenizer)
    if tokenizer.pad_token_id != text_encoder.pad_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(text_encoder.pad_id)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        if not (Path(tmp) / "merges.txt").is_file() and hasattr(tokenizer, "backend_tokenizer"):
            _write_bpe_files(tokenizer, Path(tmp))
        for f in Path(tmp).iterdir():
            f.replace(folder / f.name)


def save_diffusers(components: Components, folder) -> None:
    """Write a diffusers StableDiffusionPipeline folder (also what ``load`` reads). Every file is written to a
    temporary name and renamed into place; model_index.json comes last, so a folder that has it is whole."""
    from transformers import CLIPTextConfig

    folder = Path(folder).expanduser()
    version = _diffusers_version()
    for name, module, cls in (("unet", components.unet, "UNet2DConditionModel"),
                              ("vae", components.vae, "AutoencoderKL")):
        write_json(folder / name / "config.json",
                   {"_class_name": cls, "_diffusers_version": version, **module.config.to_dict()})
        write_safetensors(folder / name / "diffusion_pytorch_model.safetensors", module.state_dict())
    text = components.text_encoder
    weights, text_cfg = convert_text(text.weights(), text.config, "transformers")
    clip = CLIPTextConfig(**text_cfg.clip_config()).to_dict()
    write_json(folder / "text_encoder" / "config.json",
               {**clip, "architectures": ["CLIPTextModel"], "family": text_cfg.family})
    # The "text_model." prefix is what every transformers version reads (5.x strips it on load).
    write_safetensors(folder / "text_encoder" / "model.safetensors",
                      {"text_model." + k: v for k, v in weights.items()})
    _save_tokenizer(text, folder / "tokenizer")
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "DDIMScheduler", "_diffusers_version": version, **components.schedule.to_dict()})
    if components.defaults:
        write_json(folder / DEFAULTS_FILE, components.defaults)
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    })


def sd_state_dict(unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder) -> tuple[dict, TextEncoderConfig]:
    """The networks' tensors under the original SD single-file names, and the text encoder's config as the
    file holds it (SD 2.x files: the OpenCLIP layout, context from the penultimate layer)."""
    cfg = unet.config
    tensors = scatter(unet_keymaps(unet.state_dict(), list(cfg.per_level("layers_per_block")),
                                   [t == "CrossAttnUpBlock2D" for t in cfg.up_block_types]), unet.state_dict())
    tensors.update(scatter(vae_keymaps(vae.state_dict(), len(vae.config.block_out_channels)), vae.state_dict()))
    file_layout = "clip" if text_encoder.config.family == "sd1" else "open_clip"
    weights, text_cfg = convert_text(text_encoder.weights(), text_encoder.config,
                                     "transformers" if file_layout == "clip" else "open_clip")
    tensors.update(scatter(text_keymaps(weights, file_layout, text_cfg.backend), weights))
    return tensors, text_cfg


def save_single_file(components: Components, path) -> None:
    """Write an SD single file (.safetensors, original key layout) that ``load`` and SD tools read. ldm's
    exact configs ride along as ``ldm.*`` metadata strings, so nothing is left to inference on reload."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_single_file writes .safetensors only")
    tensors, text_cfg = sd_state_dict(components.unet, components.vae, components.text_encoder)
    metadata = {"ldm.unet": components.unet.config.to_dict(), "ldm.vae": components.vae.config.to_dict(),
                "ldm.text_encoder": text_cfg.to_dict(), "ldm.scheduler": components.schedule.to_dict(),
                "ldm.defaults": components.defaults}
    write_safetensors(path, tensors, {k: json.dumps(v) for k, v in metadata.items()})
