"""Swapping a pipeline's VAE (``Pipeline.load_vae``), and cheap previews of the image while it is sampled.

    pipe.load_vae("vae-ft-mse-840000-ema-pruned.safetensors")   # an SD/SDXL VAE file or diffusers folder
    pipe.load_vae("taesd/")                                     # TAESD / TAESDXL: 1.2 M parameters a half
    pipe(prompt, callback=lambda info: info["preview"][0].save(f"step-{info['i']}.png"))   # every step's
    pipe(prompt, callback=previews(pipe, lambda step, images: images[0].save(f"{step}.png"), every=5))

The new VAE takes the old one's place everywhere (decoding, img2img's encoding, tiling, lean packing, the
pipeline's ``vae_dtype`` and device); what it is goes into every image's metadata as A1111 writes it ("VAE: name",
"VAE hash: first 10 hex digits of its sha256"). Which files are recognised, and the latent scale a bare file
gets: ``ldm.checkpoints.vae_files``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.infer import SDXL_SCALING_FACTOR
from ldm.checkpoints.library import resolve_file
from ldm.checkpoints.tensor_io import CheckpointError
from ldm.checkpoints.vae_files import VAEFile, load_vae_file
from ldm.models.conv import pack_for_inference
from ldm.models.taesd import AutoencoderTiny
from ldm.pipeline.png_info import weights_hash

# A1111's "Approximate cheap" live preview (modules/sd_vae_approx.py, cheap_approximation, after
# discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2): each pixel's RGB in about [-1, 1] as
# a linear map of its 4 scaled latent channels, rows = latent channel, columns = R, G, B.
SD_SCALING_FACTOR = 0.18215     # SD 1.x/2.x's latent scale (Rombach et al. 2022, §4.3.2)
APPROX_CHEAP = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}


def model_latent_scale(pipe) -> tuple[float, float | None]:
    """The (scaling_factor, shift_factor) the model's U-Net works in: its own VAE's, remembered at the first
    swap. A TAESD works in that scale already (its own factor is 1.0), so a model that came with one (a folder
    saved after a swap) gets its family's: SDXL's 0.13025, else SD's 0.18215."""
    if getattr(pipe, "_latent_scale", None) is None:
        cfg = pipe.vae.config
        if isinstance(pipe.vae, AutoencoderTiny):
            family = getattr(getattr(pipe.components, "info", None), "family", None) or "sd1"
            pipe._latent_scale = (SDXL_SCALING_FACTOR if family.startswith("sdxl") else SD_SCALING_FACTOR, None)
        else:
            pipe._latent_scale = (cfg.scaling_factor, cfg.shift_factor)
    return pipe._latent_scale


def load_vae(pipe, path) -> object:
    """Replace ``pipe``'s VAE by the one in ``path``; returns ``pipe``. A VAE whose latents are not the model's
    (other channel count or downscale) is refused, naming the file, and the pipeline keeps its VAE. A name that is
    not a path is looked up in the pipeline's models folder (``ldm.checkpoints.library``)."""
    path = resolve_file("vae", path, getattr(pipe, "library", None))
    scale, shift = model_latent_scale(pipe)
    old = pipe.vae
    loaded = load_vae_file(path, dtype=pipe.vae_dtype, scaling_factor=scale, shift_factor=shift,
                           sample_size=getattr(old, "tile_size", 512) or 512)
    vae, cfg = loaded.vae, loaded.vae.config
    label = "TAESD" if loaded.kind == "tiny" else "VAE"
    if cfg.latent_channels != pipe.latent_channels:
        raise CheckpointError(f"{loaded.path}: a {label} with {cfg.latent_channels} latent channels; this model's "
                              f"U-Net works on {pipe.latent_channels} (a VAE of another model family?)")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if factor != pipe.vae_scale_factor:
        raise CheckpointError(f"{loaded.path}: a {label} that scales images down {factor}x; this model's latents "
                              f"are {pipe.vae_scale_factor}x smaller than its images")
    home = torch.device("cpu") if getattr(pipe, "_offload", None) is not None else pipe.device
    vae.to(device=home, dtype=pipe.vae_dtype).eval().requires_grad_(False)
    if getattr(old, "tiling", False):
        vae.set_tiling(True, old.tile_size)
    if getattr(pipe, "lean", False):
        pack_for_inference(vae)
    pipe.vae = pipe.components.vae = vae
    pipe.vae_file = loaded
    return pipe


class VAEFeatures:
    """The Pipeline's VAE-swapping method (a mixin, as ``PromptFeatures`` and ``Applications`` are)."""

    def load_vae(self, path):
        """Swap the VAE for the one in ``path``: an SD/SDXL VAE file (.safetensors/.ckpt/.pt) or diffusers folder,
        or TAESD/TAESDXL (a diffusers AutoencoderTiny folder, or taesd_decoder.pth with taesd_encoder.pth beside
        it). Returns the pipeline."""
        return load_vae(self, path)


@functools.lru_cache(maxsize=16)
def _hash(path: Path, mtime: float, size: int) -> str:
    return weights_hash(path)


def vae_metadata(pipe) -> dict[str, str]:
    """{"vae": its name, "vae_hash": its hash} of a VAE loaded with ``load_vae``; {} for the model's own."""
    loaded: VAEFile | None = getattr(pipe, "vae_file", None)
    if loaded is None or pipe.vae is not loaded.vae:
        return {}
    hashed = loaded.hashed
    stat = hashed.stat() if hashed.is_file() else None
    digest = _hash(hashed, stat.st_mtime if stat else 0.0, stat.st_size if stat else 0) if hashed.exists() else None
    return {"vae": loaded.name, **({"vae_hash": digest} if digest else {})}


# -- live previews ------------------------------------------------------------------------------------------
def cheap_rgb(z: torch.Tensor, family: str = "sd") -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> RGB (B, 3, h, w) in about [-1, 1], A1111's "Approx cheap" linear map."""
    coeffs = torch.tensor(APPROX_CHEAP["sdxl" if family.startswith("sdxl") else "sd"], dtype=torch.float32)
    return torch.einsum("blhw,lr->brhw", z.float().cpu(), coeffs)


def preview_images(pipe, z: torch.Tensor) -> list[Image.Image]:
    """Cheap pictures of scaled latents: TAESD's decode when the pipeline's VAE is a TAESD, else the linear
    approximation (at latent resolution, 1/8 of the image's side). Never the full VAE: a preview must cost little."""
    if isinstance(pipe.vae, AutoencoderTiny):
        with torch.no_grad(), pipe.placed(pipe.vae):
            rgb = pipe.vae.decode(z.to(pipe.device), dtype=pipe.vae_dtype).float().cpu()
    else:
        family = getattr(getattr(pipe.components, "info", None), "family", None) or "sd"
        if z.shape[1] != len(APPROX_CHEAP["sd"]):
            return []
        rgb = cheap_rgb(z, family)
    unit = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(u)) for u in unit]


class StepInfo(dict):
    """What a sampler step tells ``callback`` (i, sigma, sigma_next, x, denoised, steps), plus ``"preview"``: the
    step's x0 estimate as PIL images (``preview_images``), made only when read, so a callback that never looks at
    it costs nothing."""

    def __init__(self, pipe, info: dict):
        super().__init__(info)
        self._pipe = pipe

    def __missing__(self, key):
        if key != "preview":
            raise KeyError(key)
        self["preview"] = images = preview_images(self._pipe, self["denoised"])
        return images

    def get(self, key, default=None):
        return self[key] if key == "preview" or key in self else default


def previews(pipe, on_preview: Callable[[int, list[Image.Image]], None], every: int = 1,
             callback: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """A sampler callback that shows each ``every``-th step's x0 estimate: ``on_preview(step, images)`` with one
    PIL image per batch row (``preview_images``). ``callback``, if given, still gets every step's info."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")

    def on_step(info: dict) -> None:
        if callback is not None:
            callback(info)
        step = int(info["i"]) + 1
        if step % every == 0 or step == int(info.get("steps", step)):
            on_preview(step, info["preview"] if isinstance(info, StepInfo) else preview_images(pipe, info["denoised"]))

    return on_step
