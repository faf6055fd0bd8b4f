"""Tiny models folders in the layouts people already have (an A1111/Forge install, a ComfyUI install), written
with ldm's own saving helpers from the tiny SD 1.x model of tiny_models.py, and a fake Hugging Face cache in
huggingface_hub's own layout (blobs/, snapshots/REV/ of symlinks, refs/main)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

# kind -> (A1111 folder, ComfyUI folder), relative to the install's root
LAYOUTS = {"a1111": {"checkpoint": "models/Stable-diffusion", "lora": "models/Lora", "vae": "models/VAE",
                     "controlnet": "models/ControlNet", "embedding": "embeddings"},
           "comfyui": {"checkpoint": "models/checkpoints", "lora": "models/loras", "vae": "models/vae",
                       "controlnet": "models/controlnet", "embedding": "models/embeddings"}}


def _lora(components, path: Path, seed: int) -> Path:
    from ldm.checkpoints.adapters.kohya import save_kohya
    from ldm.checkpoints.adapters.lora import adapters, add_lora, unload

    add_lora(components.unet, rank=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(components.unet).values():
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=generator) * 0.3)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=generator) * 0.3)
    save_kohya(path, {"unet": components.unet})
    unload(components.unet)
    return path


def build_models_dir(root: Path, layout: str, sd1_folder: Path) -> Path:
    """An install of ``layout`` holding every kind: two checkpoints (a single file in a subfolder, a diffusers
    folder), a LoRA, a VAE, a ControlNet and an embedding."""
    from ldm.checkpoints import load, save_single_file
    from ldm.checkpoints.tensor_io import write_safetensors

    folders = {kind: root / rel for kind, rel in LAYOUTS[layout].items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    components = load(sd1_folder)
    (folders["checkpoint"] / "sub").mkdir()
    save_single_file(components, folders["checkpoint"] / "sub" / "tiny.safetensors")
    shutil.copytree(sd1_folder, folders["checkpoint"] / "tiny-diffusers")
    _lora(components, folders["lora"] / "style.safetensors", 1)
    write_safetensors(folders["vae"] / "tiny-vae.safetensors",
                      {k: v.contiguous() for k, v in components.vae.state_dict().items()})
    write_safetensors(folders["embedding"] / "shiny.safetensors",
                      {"emb_params": torch.randn(2, components.text_encoder.hidden_size,
                                                 generator=torch.Generator().manual_seed(3))})
    _controlnet(sd1_folder, folders["controlnet"] / "tiny-control.safetensors")
    return root


def _controlnet(sd1_folder: Path, path: Path) -> Path:
    from diffusers import UNet2DConditionModel

    from control_fixtures import tiny_controlnet, write_original_controlnet

    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    return write_original_controlnet(tiny_controlnet(unet), path)


def fake_hf_cache(cache: Path, repo_id: str, model_folder: Path, revision: str = "0" * 40) -> Path:
    """``model_folder`` stored as huggingface_hub stores a download: ``models--ORG--NAME/blobs/<sha256>`` holding
    the bytes, ``snapshots/<revision>/<path>`` relative symlinks to them, ``refs/main`` naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / revision
    for file in sorted(p for p in model_folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
