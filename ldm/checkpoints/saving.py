"""Saving SD-family models: diffusers pipeline folders and SD single files, both readable by ``load`` and by
the tools people use (diffusers, A1111, ComfyUI). Every file is written atomically (``ldm.files``).

    save_diffusers(components, "out/model")                     # StableDiffusionPipeline.from_pretrained loads it
    save_single_file(components, "out/model.safetensors")       # the original SD layout; load() reads it back

SDXL models are saved as diffusers' StableDiffusionXLPipeline (the refiner: StableDiffusionXLImg2ImgPipeline)
and as the released SDXL single file (sgm's conditioner layout, see ``keys``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ldm.checkpoints.components import Components
from ldm.checkpoints.infer import SDXL_PIPELINE_FLAGS, TEXT_METADATA
from ldm.checkpoints.keys import SINGLE_FILE_TEXT, convert_text, scatter, text_keymaps, unet_keymaps, vae_keymaps
from ldm.checkpoints.loading import DEFAULTS_FILE, TEXT_SLOTS
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


def _family(components_or_unet, has_second_encoder: bool) -> str:
    unet = getattr(components_or_unet, "unet", components_or_unet)
    if unet.config.addition_embed_type == "text_time":
        return "sdxl" if has_second_encoder else "sdxl_refiner"
    return ""


# diffusers' SDXL pipelines (model_index.json of stable-diffusion-xl-base-1.0 and -refiner-1.0): their class, and
# the subfolders of the text encoders in prompt order (the refiner has bigG alone, as text_encoder_2).
SDXL_PIPELINES = {"sdxl": ("StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2")),
                  "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", ("text_encoder_2",))}


def _sdxl_text(text: TextEncoder) -> TextEncoder:
    if text.config.backend != "transformers":
        raise ValueError("SDXL text encoders are saved from transformers CLIP models, not open_clip towers")
    return text


def _write_text_encoder(folder: Path, name: str, tokenizer_name: str, text: TextEncoder, sdxl: bool) -> str:
    """One text encoder subfolder and its tokenizer; returns the transformers class it holds. SDXL's encoders are
    written whole (the context layer is the config's business: the loader reads SDXL's penultimate layer)."""
    from transformers import CLIPTextConfig

    if sdxl:
        weights, text_cfg = _sdxl_text(text).weights(), text.config
    else:
        weights, text_cfg = convert_text(text.weights(), text.config, "transformers")
    cls = "CLIPTextModelWithProjection" if sdxl and text_cfg.with_projection else "CLIPTextModel"
    clip = CLIPTextConfig(**text_cfg.clip_config()).to_dict()
    write_json(folder / name / "config.json", {**clip, "architectures": [cls], "family": text_cfg.family})
    # The "text_model." prefix is what every transformers version reads (5.x strips it on load); the projection
    # of CLIPTextModelWithProjection sits beside text_model.
    write_safetensors(folder / name / "model.safetensors",
                      {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in weights.items()})
    _save_tokenizer(text, folder / tokenizer_name)
    return cls


def save_diffusers(components: Components, folder) -> None:
    """Write a diffusers StableDiffusionPipeline folder (SDXL: StableDiffusionXLPipeline, or
    StableDiffusionXLImg2ImgPipeline for the refiner), which ``load`` reads too. Every file is written to a
    temporary name and renamed into place; model_index.json comes last, so a folder that has it is whole."""
    folder = Path(folder).expanduser()
    version = _diffusers_version()
    for name, module, cls in (("unet", components.unet, "UNet2DConditionModel"),
                              ("vae", components.vae, type(components.vae).__name__)):   # or AutoencoderTiny
        write_json(folder / name / "config.json",
                   {"_class_name": cls, "_diffusers_version": version, **module.config.to_dict()})
        write_safetensors(folder / name / "diffusion_pytorch_model.safetensors", module.state_dict())
    family = _family(components, components.text_encoder_2 is not None)
    pipeline, slots = SDXL_PIPELINES.get(family, ("StableDiffusionPipeline", ("text_encoder",)))
    index = {"_class_name": pipeline, "_diffusers_version": version,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", type(components.vae).__name__],
             "scheduler": ["diffusers", "DDIMScheduler"], "feature_extractor": [None, None],
             "image_encoder": [None, None]}
    for name in ("text_encoder", "text_encoder_2") if family else ("text_encoder",):
        index[name] = index[TEXT_SLOTS[name]] = [None, None]
    for name, text in zip(slots, components.text_encoders):
        index[name] = ["transformers", _write_text_encoder(folder, name, TEXT_SLOTS[name], text, bool(family))]
        index[TEXT_SLOTS[name]] = ["transformers", "CLIPTokenizer"]
    if family:       # the flags each pipeline class takes (the base's has no aesthetic score)
        flags = {**SDXL_PIPELINE_FLAGS[family], **components.pipeline_config}
        index.update({k: bool(flags.get(k, False)) for k in SDXL_PIPELINE_FLAGS[family]})
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "DDIMScheduler", "_diffusers_version": version, **components.schedule.to_dict()})
    if components.defaults:
        write_json(folder / DEFAULTS_FILE, components.defaults)
    write_json(folder / "model_index.json", index)


def sd_state_dict(unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, text_encoder_2: TextEncoder | None = None
                  ) -> tuple[dict, list[TextEncoderConfig]]:
    """The networks' tensors under the original single-file names, and the text encoders' configs as the file
    holds them (SD 2.x files: the OpenCLIP layout, context from the penultimate layer; SDXL: sgm's conditioner,
    bigG in the OpenCLIP layout)."""
    cfg = unet.config
    tensors = scatter(unet_keymaps(unet.state_dict(), list(cfg.per_level("layers_per_block")),
                                   [t == "CrossAttnUpBlock2D" for t in cfg.up_block_types]), unet.state_dict())
    tensors.update(scatter(vae_keymaps(vae.state_dict(), len(vae.config.block_out_channels)), vae.state_dict()))
    family = _family(unet, text_encoder_2 is not None)
    if family:
        configs = []
        for (layout, prefix), text in zip(SINGLE_FILE_TEXT[family], (text_encoder, text_encoder_2)):
            weights = _sdxl_text(text).weights()
            tensors.update(scatter(text_keymaps(weights, layout, "transformers", prefix), weights))
            configs.append(text.config)
        return tensors, configs
    file_layout = "clip" if text_encoder.config.family == "sd1" else "open_clip"
    weights, text_cfg = convert_text(text_encoder.weights(), text_encoder.config,
                                     "transformers" if file_layout == "clip" else "open_clip")
    tensors.update(scatter(text_keymaps(weights, file_layout, text_cfg.backend), weights))
    return tensors, [text_cfg]


def save_single_file(components: Components, path) -> None:
    """Write a single file (.safetensors, the original SD / SDXL key layout) that ``load`` and SD tools read.
    ldm's exact configs ride along as ``ldm.*`` metadata strings, so nothing is left to inference on reload."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_single_file writes .safetensors only")
    if not isinstance(components.vae, AutoencoderKL):
        raise ValueError(f"{path}: an SD single file holds an AutoencoderKL, not this {type(components.vae).__name__} "
                         "(a TAESD swapped in); save a diffusers folder instead")
    tensors, text_cfgs = sd_state_dict(components.unet, components.vae, *components.text_encoders)
    metadata = {"ldm.unet": components.unet.config.to_dict(), "ldm.vae": components.vae.config.to_dict(),
                **{key: cfg.to_dict() for key, cfg in zip(TEXT_METADATA, text_cfgs)},
                "ldm.scheduler": components.schedule.to_dict(), "ldm.defaults": components.defaults}
    if components.pipeline_config:
        metadata["ldm.pipeline"] = components.pipeline_config
    write_safetensors(path, tensors, {k: json.dumps(v) for k, v in metadata.items()})
