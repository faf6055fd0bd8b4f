"""Image-conditioned uses of the one Pipeline: img2img, inpaint, denoise, anomaly, upscale.

All of them start the reverse process part-way, from an image's latents z0 with noise added at some σ
(SDEdit, Meng et al. 2022): x = z0 + σ·n is exactly a sample of the forward process at that σ (σ-space,
Karras et al. 2022), so any sampler can take it from there down the rest of the model's σ schedule.

``Applications`` is a mixin of ``ldm.pipeline.Pipeline``: it uses the pipeline's pieces (request, encode_images,
guided_denoiser, sample, decode_latents, finish) and adds nothing else to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.pipeline import images as img
from ldm.pipeline.control import as_controls, control_info, controlling

# keyword options that run a request rather than describe it
_RUN_OPTIONS = ("callback", "progress", "output_type", "control")


class Applications:
    # ------------------------------------------------------------------ image-to-image (SDEdit)
    def img2img(self, prompt, image, strength: float = 0.8, **options):
        """Redraw ``image`` toward ``prompt``: noise its latents to the σ a fraction ``strength`` into the schedule,
        then denoise. strength 0 returns the image's VAE round trip, 1 keeps almost nothing of it. ``options``:
        the keyword arguments of ``Pipeline.__call__`` (negative_prompt, steps, guidance, sampler, seed, control,
        ...; height/width resize the image). A control unit's start/end are fractions of the steps run here."""
        source, req, run = self._image_request(prompt, image, options)
        strength = _unit_interval(strength, "strength")
        z0 = self._repeat(self.encode_images(img.to_tensor(source)), req.batch)
        generators = self.generators(req.seeds)
        z = self._from_latents(req, z0, strength, generators, run)
        return self.finish(z, req, run["output_type"], mode="img2img", strength=strength,
                           **control_info(run["control"]))

    # ------------------------------------------------------------------ inpainting
    def inpaint(self, prompt, image, mask, strength: float = 1.0, *, paste_back: bool = True, **options):
        """Repaint the white part of ``mask`` (same size as ``image``). A 9-channel inpainting U-Net gets the mask
        and the masked image's latents as extra input channels (as diffusers feeds SD-inpainting); any other
        model keeps the known region by replacing its x0 estimate there with the image's latents at every step
        (so the sampler's x tracks z0 + σ·noise outside the mask and ends exactly on z0). ``paste_back`` copies
        the original pixels outside the mask into the decoded result (soft masks blend)."""
        source, req, run = self._image_request(prompt, image, options)
        strength = _unit_interval(strength, "strength")
        mask_px = img.load_mask(mask, source.size)  # checked before any model runs
        pixels = img.to_tensor(source)
        z0 = self._repeat(self.encode_images(pixels), req.batch)
        generators = self.generators(req.seeds)
        if self.is_inpainting_model:
            extra = self.inpaint_conditioning(pixels, mask_px)
            extra = {k: self._repeat(v, req.batch) for k, v in extra.items()}
            z = self._from_latents(req, z0, strength, generators, run, extra=extra)
        else:
            # a latent cell is repainted if any pixel it covers is (max-pool), so no masked pixel stays as it was
            keep = 1.0 - F.max_pool2d((mask_px >= 0.5).float(), self.vae_scale_factor).to(self.device)
            z = self._from_latents(req, z0, strength, generators, run, known=(z0, keep))
            z = keep * z0 + (1.0 - keep) * z  # the last step lands on the clean latents (diffusers does the same)
        info = dict(mode="inpaint", strength=strength, **control_info(run["control"]))
        if run["output_type"] == "latent" or not paste_back:
            return self.finish(z, req, run["output_type"], **info)
        decoded = img.to_unit(self.decode_latents(z))
        alpha = mask_px[0, 0, :, :, None].numpy()
        unit = alpha * decoded + (1.0 - alpha) * img.to_unit(pixels)
        return self.output(unit.astype(np.float32), req, run["output_type"], **info)

    def inpaint_conditioning(self, pixels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra inputs of a 9-channel inpainting U-Net: the binarized mask at latent size (nearest) and the
        latents of the image with the masked part blanked (diffusers: image * (mask < 0.5))."""
        binary = (mask >= 0.5).float()
        masked_latents = self.encode_images(pixels * (1.0 - binary))
        size = (pixels.shape[-2] // self.vae_scale_factor, pixels.shape[-1] // self.vae_scale_factor)
        return {"mask": F.interpolate(binary, size=size), "masked_latents": masked_latents}

    # ------------------------------------------------------------------ denoising a noisy photo
    def denoise(self, image, noise_level: float | None = None, prompt: str = "", **options):
        """Remove Gaussian noise from a photo. ``noise_level``: the noise's standard deviation in [0, 1] pixel
        units (None: estimated from the image). The image's latents are treated as the forward process at the
        latent σ that this pixel noise produces (measured through the encoder), and the reverse process runs
        from there. Guidance defaults to 1 (no CFG) and the prompt to ""."""
        options.setdefault("guidance", 1.0)
        source, req, run = self._image_request(prompt, image, options)
        if run["control"]:
            raise TypeError("denoise() takes no control (use img2img with control=)")
        pixels = img.to_tensor(source)
        sigma_px = estimate_noise(pixels) if noise_level is None else float(noise_level)
        if not 0.0 <= sigma_px <= 1.0:
            raise ValueError(f"noise_level must be in [0, 1] (std in pixel units), got {noise_level}")
        z = self.encode_images(pixels)
        sigma = min(self.latent_sigma(pixels, z, sigma_px), float(self.schedule.sigma_max))
        full = self.sigmas(req)
        sigmas = torch.cat([full.new_tensor([sigma]), full[full < sigma]])
        x = self._repeat(z, req.batch)
        z = self.sample(self.guided_denoiser(req), x, sigmas, req, self.generators(req.seeds), run["callback"],
                        run["progress"]) if sigma > 0 else x
        return self.finish(z, req, run["output_type"], mode="denoise", noise_level=round(sigma_px, 5))

    def latent_sigma(self, pixels: torch.Tensor, z: torch.Tensor, sigma_px: float, draws: int = 2) -> float:
        """The latent noise σ that pixel noise of std ``sigma_px`` (in [0, 1] units) causes: the RMS change of the
        (scaled) latents when that much fresh noise is added, averaged over a few fixed draws."""
        if sigma_px == 0:
            return 0.0
        generator = torch.Generator().manual_seed(0)
        change = []
        for _ in range(draws):
            noisy = pixels + 2.0 * sigma_px * torch.randn(pixels.shape, generator=generator)  # [-1, 1] units
            change.append((self.encode_images(noisy) - z).pow(2).mean())
        return float(torch.stack(change).mean().sqrt())

    # ------------------------------------------------------------------ anomaly scoring
    def anomaly(self, image, strength: float = 0.5, *, seeds=(0, 1, 2), prompt: str = "", **options):
        """Reconstruction-based anomaly score: noise the image's latents to ``strength``, denoise, decode, and
        compare with the image's own VAE round trip (so only what the diffusion prior changes counts). Parts the
        model finds unlikely are redrawn and light up. Averaged over ``seeds`` (one batch).
        Returns (score, error_map): error_map is (H, W) float32, the mean |difference| over RGB in [0, 1] units;
        score is its 99th percentile (small defects count, a few stray pixels do not)."""
        options.setdefault("guidance", 1.0)
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("anomaly() needs at least one seed")
        strength = _unit_interval(strength, "strength")
        options.update(seed=seeds, progress=options.get("progress", False))
        source, req, run = self._image_request([prompt] * len(seeds), image, options)
        z0 = self.encode_images(img.to_tensor(source))
        reference = img.to_unit(self.decode_latents(z0))[0]
        z = self._from_latents(req, self._repeat(z0, req.batch), strength, self.generators(req.seeds), run)
        recon = img.to_unit(self.decode_latents(z))
        error_map = np.abs(recon - reference[None]).mean(axis=(0, 3)).astype(np.float32)
        return float(np.quantile(error_map, 0.99)), error_map

    # ------------------------------------------------------------------ super-resolution
    def upscale(self, image, factor: float = 2, prompt: str = "", strength: float = 0.3, *, mode: str = "pixel",
                **options):
        """Enlarge by ``factor`` then refine with img2img at low ``strength``. mode="pixel": Lanczos resize of the
        image, then encode; mode="latent": bicubic resize of the latents (cheaper; it blurs, so use strength
        around 0.5 or more)."""
        source = img.load_image(image)
        if mode not in ("pixel", "latent"):
            raise ValueError(f"upscale mode must be 'pixel' or 'latent', got {mode!r}")
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
            raise ValueError(f"upscale factor must be a number >= 1, got {factor!r}")
        width, height = round(source.width * factor), round(source.height * factor)
        if mode == "pixel":
            big = source.resize((width, height), Image.Resampling.LANCZOS)
            return self.img2img(prompt, big, strength, **options)
        strength = _unit_interval(strength, "strength")
        _, req, run = self._image_request(prompt, source.resize((width, height)), options)
        z_small = self.encode_images(img.to_tensor(source))
        z0 = F.interpolate(z_small, size=(height // self.vae_scale_factor, width // self.vae_scale_factor),
                           mode="bicubic", align_corners=False)
        z = self._from_latents(req, self._repeat(z0, req.batch), strength, self.generators(req.seeds), run)
        return self.finish(z, req, run["output_type"], mode="upscale", strength=strength, factor=factor)

    # ------------------------------------------------------------------ shared steps
    def _image_request(self, prompt, image, options: dict):
        """Load and size-check the image, validate the request (height/width default to the image's size and,
        when given, resize it). Returns (PIL image, Request, run options)."""
        unknown = set(options) - set(_RUN_OPTIONS) - {
            "negative_prompt", "steps", "guidance", "sampler", "height", "width", "seed", "num_images_per_prompt",
            "eta", "guidance_rescale", "clip_skip", "spacing"}
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        source = img.load_image(image)
        run = {"callback": options.pop("callback", None), "progress": options.pop("progress", True),
               "output_type": options.pop("output_type", "pil"), "control": as_controls(options.pop("control", None))}
        height, width = options.pop("height", None), options.pop("width", None)
        if height is None and width is None:
            multiple = max(8, self.vae_scale_factor)
            if source.width % multiple or source.height % multiple:
                raise ValueError(f"the image is {source.width}x{source.height}; both sides must be multiples of "
                                 f"{multiple} (resize it, or pass height= and width= to have it resized)")
        req = self.request(prompt, height=height or source.height, width=width or source.width,
                           output_type=run["output_type"], **options)
        if source.size != (req.width, req.height):
            source = source.resize((req.width, req.height), Image.Resampling.LANCZOS)
        return source, req, run

    def _from_latents(self, req, z0, strength, generators, run, *, extra=None, known=None) -> torch.Tensor:
        """SDEdit from z0: skip the first (1 − strength) of the schedule, x = z0 + σ_start·n, sample the rest.
        ``known=(z_known, keep)``: the x0 estimate is z_known wherever keep is 1 (inpainting by replacement)."""
        sigmas = self.sigmas(req)
        start = req.steps - min(int(req.steps * strength), req.steps)  # diffusers' img2img get_timesteps
        sigmas = sigmas[start:]
        if len(sigmas) < 2:
            return z0
        noise = self.noise(z0.shape, generators)
        x = z0.to(self.device) + float(sigmas[0]) * noise
        with controlling(self, run.get("control"), req, sigmas) as hints:   # start/end: fractions of these steps
            denoiser = self.guided_denoiser(req, {**(extra or {}), **hints})
            if known is not None:
                denoiser = _keep_known(denoiser, *known)
            return self.sample(denoiser, x, sigmas, req, generators, run["callback"], run["progress"])

    def _repeat(self, z: torch.Tensor, batch: int) -> torch.Tensor:
        return z.to(self.device).expand(batch, *z.shape[1:]).contiguous() if z.shape[0] == 1 else z.to(self.device)


def _keep_known(denoiser, z_known: torch.Tensor, keep: torch.Tensor):
    """D'(x, σ) = keep·z_known + (1 − keep)·D(x, σ): samplers step toward the known latents where keep = 1."""

    def blended(x, sigma, **cond):
        return keep * z_known + (1.0 - keep) * denoiser(x, sigma, **cond)

    return blended


def estimate_noise(pixels: torch.Tensor) -> float:
    """Std of white Gaussian noise in an image (in [0, 1] units): median absolute value of the finest diagonal
    Haar wavelet coefficients / 0.6745 (Donoho & Johnstone 1994). pixels: (1, 3, H, W) in [-1, 1]."""
    x = (pixels[0].double() + 1.0) / 2.0
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[:, :h, :w]
    diagonal = (x[:, 0::2, 0::2] - x[:, 0::2, 1::2] - x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 2.0
    return float(diagonal.abs().median() / 0.6745)


def _unit_interval(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value
