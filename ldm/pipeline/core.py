"""Pipeline: the data path of DESIGN.md, top to bottom.

    prompt ─► text encoder ─► context ─┐
    seeds ─► CPU noise x_T ─► sampler ◄┴ guidance(denoiser(U-Net)) ─► latents ─► VAE decode (float32) ─► images

Sampling happens in σ-space (Karras et al. 2022): x = x0 + σ·n. A variance-preserving (VP) sample x_vp, which is
what diffusers keeps, is x / sqrt(1 + σ²). Image-to-image, inpainting, denoising, anomaly scoring and upscaling
reuse the same pieces and live in ``applications.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm import assets
from ldm.checkpoints import load, save_diffusers
from ldm.checkpoints.adapters import Patches, load_adapter
from ldm.checkpoints.library import open_library, resolve_model
from ldm.denoiser import Denoiser
from ldm.devices import dtype_name, resolve_device, resolve_dtype, resolve_vae_dtype
from ldm.guidance import classifier_free, conditioned, guidance_conditions
from ldm.models.conv import pack_for_inference, unpack
from ldm.pipeline import images as img
from ldm.pipeline import prompting, vae_swap
from ldm.pipeline.applications import Applications
from ldm.pipeline.conditioning import SizeConditioning, TextConditioner
from ldm.pipeline.control import control_info, controlling, load_unit
from ldm.pipeline.memory import check_memory
from ldm.pipeline.openvino_backend import (OpenVINONetwork, prepare, resolve_backend, sampling_threads, unet_runner,
                                           vae_runner)
from ldm.pipeline.png_info import GenerationInfo, attach, weights_hash
from ldm.pipeline.request import Request, as_negatives, as_prompts, as_seeds, finite, positive_int
from ldm.rng import generators_for, randn
from ldm.samplers import check_eta, get_sampler, resolve_spacing, sampler_sigmas, schedule_hints_of
from ldm.schedules import NoiseSchedule

# Stable Diffusion's usual settings, for what a model's Components.defaults (its ldm.json) does not say. Keys read
# here: steps, guidance, size or height/width; the CLI also takes sampler and spacing from them.
SD_DEFAULTS = {"steps": 30, "guidance": 7.5}
FAMILY_DEFAULTS = {"sdxl": {"guidance": 5.0}, "sdxl_refiner": {"guidance": 5.0}}   # diffusers' SDXL pipelines
OUTPUT_TYPES = ("pil", "np", "latent")
CONTINUOUS_SPACINGS = ("karras", "exponential")
# Most images per U-Net call in batch-invariant mode (Pipeline.micro_batch): calls of up to 2·MICRO_BATCH rows
# under CFG, the sizes whose bit-stability tests/pipeline/test_batch_invariance.py checks.
MICRO_BATCH = 4


class DefaultModelMissing(FileNotFoundError):
    """The shipped default model is not installed in this copy of ldm."""


class Pipeline(prompting.PromptFeatures, Applications, vae_swap.VAEFeatures):
    """Text-to-image (``__call__``) plus img2img / inpaint / denoise / anomaly / upscale (``Applications``)."""

    def __init__(self, components=None, *, device=None, dtype=None, vae_dtype=None, compile=False,
                 source: str | Path | None = None, lean: bool | None = None, emphasis: bool = True,
                 lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
                 lora_strict: bool = True, backend: str | None = None, models_dir: str | Path | None = None):
        """``Pipeline()`` loads the shipped default model; ``components`` (``ldm.checkpoints.Components``) wraps
        models already in memory. ``dtype``: None = float32 (identical images everywhere); "auto" = the fast one
        for the device (``ldm.devices.auto_dtype``: bf16 on CPUs with native bf16, fp16 on CUDA). ``vae_dtype``:
        None = bf16 under dtype="auto" on such a CPU, float32 otherwise (``ldm.devices.resolve_vae_dtype``);
        anything below float32 is a lower-precision decode, with a float32 fallback on NaN/inf.
        ``lean``: keep one copy of each convolution weight, the CPU-packed one (``ldm.models.conv``; for SD 1.5
        in float32 that saves ~2 GB). Default: on when the Pipeline loaded the weights itself (``Pipeline()``,
        ``from_pretrained``), off for ``components`` whose tensors the caller may hold. Working on the weights
        by hand (an optimizer over ``pipe.unet.parameters()``)? Turn it off with ``pipe.set_lean(False)``.
        ``emphasis``: read prompts in A1111's syntax (``ldm.pipeline.prompting``); ``lora_dir``: where
        ``<lora:NAME:W>`` tags find NAME.safetensors; ``embeddings_dir``: textual-inversion files loaded now,
        each under its file's stem. ``models_dir``: a models folder (A1111 / ComfyUI / ldm layout; default
        $LDM_MODELS_DIR) whose names LoRA tags, ``load_vae`` and ``load_control`` take and whose embeddings load
        (``ldm.checkpoints.library``). ``compile``: run the U-Net through torch.compile (the first call at each
        batch and size compiles, tens of seconds on a CPU; what it buys: docs/benchmarks.md). ``backend``: "auto"
        (default; $LDM_BACKEND overrides it): OpenVINO runs the U-Net and the VAE decoder on the CPU when it is
        installed, PyTorch otherwise; or "torch" / "openvino" (``ldm.pipeline.openvino_backend``)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.vae_dtype = resolve_vae_dtype(vae_dtype, dtype, self.device)
        if components is None:
            components, source = _load_default(), assets.DEFAULT_MODEL
            lean = True if lean is None else lean
        self.components = components
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.text_encoder_2 = getattr(components, "text_encoder_2", None)    # SDXL base: OpenCLIP bigG
        self.text_encoders = [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]
        for module, dt in ((self.unet, self.dtype), *((t, self.dtype) for t in self.text_encoders),
                           (self.vae, self.vae_dtype)):
            module.to(device=self.device, dtype=dt).eval().requires_grad_(False)
        self.conditioner = TextConditioner.for_components(components)
        self.schedule = NoiseSchedule(components.schedule)
        family = getattr(getattr(components, "info", None), "family", None)
        self.defaults = {**SD_DEFAULTS, **FAMILY_DEFAULTS.get(family, {}),
                         **(getattr(components, "defaults", None) or {})}
        self.source = Path(source) if source is not None else None
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        # compile: one static graph per input shape (dynamic=False), so an image's arithmetic still depends on its
        # shape alone (batch invariance). The compiled graph reads the U-Net's weights on every call (LoRAs and
        # set_lean stay live); the U-Net keeps its plain weights, which the compiler's convolutions read.
        self.compiled = bool(compile)
        self._network: Callable = torch.compile(self.unet, dynamic=False) if compile else self.unet
        self.backend = "torch" if compile else resolve_backend(backend, self.device)
        if self.backend == "openvino":
            self._network = OpenVINONetwork(self.unet, self.dtype, name="unet")
        self._offload: torch.device | None = None
        # Run the U-Net on groups of at most `micro_batch` images, never on a single row, so that an image's
        # floating-point arithmetic never depends on what else is in the batch (CPU kernels pick blockings by
        # shape; see _PerImage). On by default on the CPU; on GPUs batching is the speed, and their kernels are
        # not bitwise stable anyway.
        self.batch_invariant = self.device.type == "cpu"
        self.micro_batch = MICRO_BATCH
        self.set_lean(bool(lean))
        self.emphasis, self.lora_strict = emphasis, lora_strict
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.adapters = Patches()
        self._controls = None   # the control units of the request running now (ldm.pipeline.control)
        self.library = self.load_library(open_library(models_dir), embeddings_dir)
        prepare(self)   # OpenVINO: the default request's graphs start building in the background

    def set_lean(self, lean: bool) -> Pipeline:
        """Keep only the packed copy of the U-Net's and VAE's convolution weights (True), or both copies and the
        plain weights always in place (False); see ``__init__``. Returns self."""
        for module in (self.unet, self.vae):
            whole_graph = self.compiled or self.backend == "openvino"    # reads the plain weights
            (pack_for_inference if lean and not (whole_graph and module is self.unet) else unpack)(module)
        self.lean = lean
        return self

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, *, vae_dtype=None, compile=False,
                        lean: bool = True, revision=None, variant=None, cache_dir=None, **options) -> Pipeline:
        """Load an SD single file (.safetensors/.ckpt), a diffusers/ldm folder, a ``models_dir`` library name, or a
        Hugging Face repo id from the local cache, offline (``revision``, ``variant``, ``cache_dir`` as diffusers)."""
        path = resolve_model(path, open_library(options.get("models_dir")), revision=revision, cache_dir=cache_dir)
        # fail on a bad name before loading gigabytes; read each network straight into its dtype
        dev = resolve_device(device)
        components = load(path, dtype=resolve_dtype(dtype, dev), vae_dtype=resolve_vae_dtype(vae_dtype, dtype, dev),
                          variant=variant)
        return cls(components, device=device, dtype=dtype, vae_dtype=vae_dtype, compile=compile, source=path,
                   lean=lean, **options)

    # ------------------------------------------------------------------ text-to-image
    def __call__(self, prompt, negative_prompt=None, steps=None, guidance=None, sampler="dpmpp_2m",
                 height=None, width=None, seed=None, num_images_per_prompt=1, latents=None, eta=0.0, *,
                 guidance_rescale=0.0, clip_skip=None, spacing=None, callback=None, progress=True,
                 output_type="pil", sizes: SizeConditioning | None = None, control=None):
        """Images for ``prompt`` (str or list): a list of PIL images (``output_type="np"``: (B, H, W, 3) floats
        in [0, 1]; ``"latent"``: the (B, C, h, w) latents before decoding). ``seed``: an int (image i gets
        seed + i) or one int per image. ``latents``: the initial noise ~ N(0, I), as diffusers takes it.
        ``eta``: the fresh-noise fraction of samplers that take one (ddim: 0 = deterministic); 0 leaves the
        ancestral/SDE samplers (euler_a, dpmpp_2m_sde) at their own default of 1. ``spacing``: None -> the
        model's timestep spacing; "karras"/"exponential" for continuous σ schedules. ``sizes``: SDXL's
        micro-conditioning (``SizeConditioning(original_size=, crops_coords_top_left=, target_size=,
        aesthetic_score=)``; default: the requested size, crop (0, 0), as diffusers). ``control``: a ``Control``
        or a list of them (ControlNets, T2I-Adapters; ``ldm.pipeline.control``)."""
        req = self.request(prompt, negative_prompt, steps, guidance, sampler, height, width, seed,
                           num_images_per_prompt, eta, guidance_rescale, clip_skip, spacing, output_type, sizes)
        shape = (req.batch, self.latent_channels, req.height // self.vae_scale_factor,
                 req.width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
        generators = self.generators(req.seeds)
        noise = latents if latents is not None else self.noise(shape, generators)
        sigmas = self.sigmas(req)
        extra = {}
        if self.is_inpainting_model:  # an inpainting U-Net draws freely when all of the image is masked
            gray = torch.zeros(1, 3, req.height, req.width)
            extra = self.inpaint_conditioning(gray, torch.ones(1, 1, req.height, req.width))
            extra = {k: v.expand(req.batch, *v.shape[1:]) for k, v in extra.items()}
        # prompt LoRAs first: they find the U-Net's layers by name, which an IP-Adapter's layers wrap for the call
        with self.prompt_loras(req.prompts) as hashes, controlling(self, control, req, sigmas) as hints:
            denoiser = self.guided_denoiser(req, {**extra, **hints})
            x = noise.to(self.device, torch.float32) * self.initial_scale(sigmas, req.spacing)
            z = self.sample(denoiser, x, sigmas, req, generators, callback, progress)
        return self.finish(z, req, output_type, **{"Lora hashes": hashes or None}, **control_info(control))

    # ------------------------------------------------------------------ validation (before any heavy work)
    def request(self, prompt, negative_prompt=None, steps=None, guidance=None, sampler="dpmpp_2m", height=None,
                width=None, seed=None, num_images_per_prompt=1, eta=0.0, guidance_rescale=0.0, clip_skip=None,
                spacing=None, output_type="pil", sizes: SizeConditioning | None = None) -> Request:
        """Check every argument and fill the model's defaults; raises ValueError naming the bad value."""
        prompts = as_prompts(prompt, "prompt")
        n = positive_int(num_images_per_prompt, "num_images_per_prompt")
        negatives, given = as_negatives(negative_prompt, len(prompts))
        # diffusers' order: each prompt n times in a row
        prompts, negatives, given = ([x for x in xs for _ in range(n)] for xs in (prompts, negatives, given))
        native = self.defaults.get("size") or self.unet.config.sample_size * self.vae_scale_factor
        height = (self.defaults.get("height") or native) if height is None else height
        width = (self.defaults.get("width") or native) if width is None else width
        img.check_size(height, width, max(8, self.vae_scale_factor))
        steps = positive_int(self.defaults["steps"] if steps is None else steps, "steps")
        guidance = finite(self.defaults["guidance"] if guidance is None else guidance, "guidance")
        get_sampler(sampler)  # an unknown name: ValueError listing the known ones
        spacing = resolve_spacing(sampler, spacing, getattr(getattr(self.components, "info", None), "family", None))
        check_eta(sampler, eta := finite(eta, "eta"))
        if not 0.0 <= finite(guidance_rescale, "guidance_rescale") <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if clip_skip is not None:
            positive_int(clip_skip, "clip_skip")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sizes is not None and not isinstance(sizes, SizeConditioning):
            raise ValueError(f"sizes must be a SizeConditioning, got {type(sizes).__name__}")
        req = Request(prompts, negatives, as_seeds(seed, len(prompts)), steps, guidance, sampler, spacing, eta,
                      height, width, float(guidance_rescale), clip_skip, given, sizes)
        self.sigmas(req)  # a spacing that cannot lay out `steps` (lcm past its 50-step grid) is refused here
        check_memory(self, req)  # a request too big for the machine is refused here, not by the OOM killer
        return req

    # ------------------------------------------------------------------ the pieces of the data path
    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel U-Net: noisy latents + mask + masked-image latents (SD-inpainting, Rombach et al. 2022)."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return generators_for(seeds)

    def noise(self, shape, generators) -> torch.Tensor:
        """N(0, I) drawn on the CPU, row i from generators[i] only (so image i ignores the batch)."""
        return randn(shape, generators, device=self.device, dtype=torch.float32)

    def sigmas(self, req: Request) -> torch.Tensor:
        """The model's σ schedule for this request, laid out as the sampler's diffusers scheduler lays it out
        (``ldm.samplers.sampler_sigmas``: DDIM and TCD end on σ at ᾱ_0, as diffusers' do)."""
        return sampler_sigmas(self.schedule, req.sampler, req.steps, req.spacing)

    def initial_scale(self, sigmas: torch.Tensor, spacing: str | None) -> float:
        """x_T = n · scale. On the discrete spacings a VP model starts from x_vp = n (diffusers' DDIM / DPM-Solver
        init_noise_sigma = 1), which in σ-space is x = n·sqrt(1 + σ_0²); Karras-style continuous schedules
        start at x = n·σ_0 (Karras et al. 2022, Algorithm 1)."""
        s0 = float(sigmas[0])
        spacing = spacing or self.schedule.config.timestep_spacing
        return s0 if spacing in CONTINUOUS_SPACINGS else math.sqrt(1.0 + s0 * s0)

    def encode_prompts(self, prompts: Sequence[str], clip_skip=None, chunks: int = 1) -> torch.Tensor:
        """(B, L·k, D) contexts (L = 77; k chunks: the longest prompt's, at least ``chunks``); each distinct prompt
        is encoded once, on its own (so no prompt's context depends on the others in the batch)."""
        return self.text_conditions(prompts, clip_skip, chunks)["context"]

    def text_conditions(self, prompts: Sequence[str], clip_skip=None, chunks: int = 1) -> dict[str, torch.Tensor]:
        """The U-Net's text conditions: {"context"} (+ SDXL's {"text_embeds"}), ``ldm.pipeline.conditioning``.
        Prompts use A1111's syntax unless ``emphasis`` is off (``ldm.pipeline.prompting``); a prompt without
        any is encoded exactly as a plain 77-token prompt."""
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for encoder in self.text_encoders:
                stack.enter_context(self.placed(encoder))
            conditions = self.conditioner.encode(prompts, clip_skip, emphasis=self.emphasis, chunks=chunks)
        return {k: v.to(self.device, self.dtype) for k, v in conditions.items()}

    def denoiser(self, blocks: int = 1, quantize: bool = True):
        """D(x, σ, context, ...) -> x0 around the U-Net (the 9-channel one concatenates its extra inputs).
        ``blocks``: how many stacked copies of the image batch one call carries (2 under classifier-free
        guidance, [uncond; cond]); in batch-invariant mode an image's rows from every block run together.
        ``quantize=False``: fractional timesteps, for samplers whose reference feeds them (lms, a schedule hint)."""
        network = unet_runner(self)
        network = _InpaintingInput(network) if self.is_inpainting_model else network
        if self._controls is not None:
            network = self._controls.network(network)
        if self.batch_invariant:
            network = _PerImage(network, blocks, self.micro_batch)
        denoiser = Denoiser(network, self.schedule, dtype=self.dtype, quantize=quantize)
        return denoiser if self._controls is None else self._controls.denoiser(denoiser)

    def guided_denoiser(self, req: Request, extra: dict[str, torch.Tensor] | None = None):
        """Classifier-free guidance over the denoiser; the unconditional context is encoded once per call."""
        extra = {**(extra or {}), **guidance_conditions(self.unet.config, req.guidance, req.batch)}   # LCM U-Nets
        extra = {k: v.to(self.device, self.dtype) for k, v in extra.items()}

        def added(negative: bool) -> dict[str, torch.Tensor]:
            ids = self.conditioner.added(req.batch, req.height, req.width, req.sizes, negative)
            return {k: v.to(self.device, self.dtype) for k, v in ids.items()}

        cond = {**self.text_conditions(req.prompts, req.clip_skip), **added(False), **extra}
        quantize = schedule_hints_of(req.sampler).get("quantize", True)
        if req.guidance == 1.0 or "timestep_cond" in extra:      # an LCM U-Net takes the guidance embedded
            return conditioned(self.denoiser(quantize=quantize), **cond)
        zeros = self.conditioner.zeros_for_empty   # SDXL base: zeros, not the encoded "", where none was given
        if zeros and not any(req.negative_given):
            text = {k: torch.zeros_like(cond[k]) for k in ("context", "text_embeds") if k in cond}
        else:   # A1111 pads prompt and negative to the same number of 77-token chunks
            text = self.text_conditions(req.negatives, req.clip_skip, self.conditioner.chunks(cond["context"]))
            if text["context"].shape[1] > cond["context"].shape[1]:
                cond.update(self.text_conditions(req.prompts, req.clip_skip, self.conditioner.chunks(text["context"])))
            if zeros and not all(req.negative_given):
                given = torch.tensor(req.negative_given, device=self.device)
                text = {k: torch.where(given.view(-1, *[1] * (v.dim() - 1)), v, 0) for k, v in text.items()}
        uncond = {**text, **added(True), **extra}
        return classifier_free(self.denoiser(2, quantize), cond, uncond, req.guidance, req.guidance_rescale)

    def sample(self, denoiser, x, sigmas, req: Request, generators, callback=None, progress=True) -> torch.Tensor:
        """Run the sampler from x at sigmas[0]; returns the VP sample (x / sqrt(1 + σ_last²) if σ_last > 0)."""
        fn = get_sampler(req.sampler)
        options = {"eta": req.eta} if req.eta else {}  # eta 0 leaves ancestral/SDE samplers at their default
        if "schedule" in inspect.signature(fn).parameters:  # lcm/tcd read timesteps off the model's schedule
            options["schedule"] = self.schedule
        steps = len(sigmas) - 1
        with tqdm(total=steps, desc=req.sampler, disable=not progress or steps == 0, leave=False) as bar:
            def on_step(info: dict[str, Any]) -> None:
                bar.update(1)
                if callback is not None:
                    callback(vae_swap.StepInfo(self, info))   # + info["preview"], made when read

            if steps > 0:
                with torch.no_grad(), self.placed(self.unet), sampling_threads(self):
                    x = fn(denoiser, x, sigmas, generator=generators, callback=on_step, **options)
        last = float(sigmas[-1])
        return x / math.sqrt(1.0 + last * last) if last > 0 else x

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (z − shift)·scale, from the posterior's mean so the round trip
        is repeatable. One image at a time, so a row never depends on the batch."""
        cfg = self.vae.config
        with torch.no_grad(), self.placed(self.vae):
            rows = [self.vae.encode(p[None].to(self.device)).mode() for p in pixels]
        return (torch.cat(rows).float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float32 in about [-1, 1]. Decodes in float32 unless ``vae_dtype`` forces
        less; a half-precision decode that overflows to NaN/inf switches the VAE to float32, with a warning."""
        cfg = self.vae.config
        z = z.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        runner = vae_runner(self)    # OpenVINO, or None: the PyTorch decoder
        with torch.no_grad(), self.placed(self.vae):
            out = torch.cat([(runner or functools.partial(self.vae.decode, dtype=self.vae_dtype))(
                r[None].to(self.device)).float() for r in z])
            if not torch.isfinite(out).all() and self.vae_dtype != torch.float32:
                warnings.warn(f"the VAE decode in {dtype_name(self.vae_dtype)} gave NaN/inf; decoding in float32 "
                              "from now on", RuntimeWarning, stacklevel=3)
                self.vae_dtype = torch.float32
                out = torch.cat([self.vae.decode(r[None].to(self.device), dtype=torch.float32) for r in z])
        if not torch.isfinite(out).all():
            raise FloatingPointError("the VAE decode produced NaN/inf even in float32 (are the latents finite?)")
        return out

    def finish(self, z: torch.Tensor, req: Request, output_type: str, **extra):
        """Latents -> the requested output; PIL images carry their generation metadata (``ldm.png_info``)."""
        if output_type == "latent":
            return z
        return self.output(img.to_unit(self.decode_latents(z)), req, output_type, **extra)

    def output(self, unit: np.ndarray, req: Request, output_type: str, **extra):
        """(B, H, W, 3) floats in [0, 1] -> themselves ("np") or PIL images with their metadata ("pil")."""
        if output_type == "np":
            return unit
        return [attach(image, self.generation_info(req, i, **extra)) for i, image in enumerate(img.to_pil(unit))]

    def generation_info(self, req: Request, i: int, **extra) -> GenerationInfo:
        return GenerationInfo(
            prompt=req.prompts[i], negative_prompt=req.negatives[i], seed=req.seeds[i], steps=req.steps,
            sampler=req.sampler, guidance=req.guidance, width=req.width, height=req.height, spacing=req.spacing,
            eta=req.eta, guidance_rescale=req.guidance_rescale, clip_skip=req.clip_skip,
            model=self.model_name, model_hash=self.model_hash, **vae_swap.vae_metadata(self),
            dtype=dtype_name(self.dtype), extra={k: v for k, v in extra.items() if v is not None})

    @property
    def model_name(self) -> str | None:
        """The model's name as A1111 records it (a file's stem, a folder's name; never a path, which would leak the
        user's folders into every shared image); None for models built in memory."""
        if self.source is None:
            return None
        if self.source.resolve() == assets.DEFAULT_MODEL.resolve():
            return assets.DEFAULT_MODEL_NAME
        return self.source.stem if self.source.is_file() else self.source.name

    @functools.cached_property
    def model_hash(self) -> str | None:
        """Short sha256 of the weights this pipeline was loaded from (None for models built in memory)."""
        return weights_hash(self.source) if self.source is not None and self.source.exists() else None

    # ------------------------------------------------------------------ memory and speed options
    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Encode/decode big images tile by tile (the VAE's own blending of overlapping tiles)."""
        self.vae.set_tiling(True, tile_size)

    def enable_attention_slicing(self, slice_size: int | None = None) -> None:
        """Compute attention a slice of heads at a time: less peak memory, a little slower."""
        self.unet.set_attention_backend("sliced", slice_size)

    def enable_sequential_cpu_offload(self, device="cuda") -> None:
        """Keep the text encoder, U-Net and VAE in CPU memory and move each to ``device`` only while it runs."""
        target = resolve_device(device)
        if target.type != "cuda":
            raise ValueError(f"sequential CPU offload moves models to a CUDA device, not {target}")
        for module in (self.unet, *self.text_encoders, self.vae):
            module.to("cpu")
        self.device, self._offload = target, target

    @contextlib.contextmanager
    def placed(self, module: torch.nn.Module):
        """Run ``module`` on the execution device (a no-op unless CPU offload is on)."""
        if self._offload is None:
            yield module
            return
        module.to(self._offload)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ saving and adapters
    def save_pretrained(self, folder) -> Path:
        """A diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, scheduler/) that both
        ``Pipeline.from_pretrained`` and diffusers load."""
        save_diffusers(self.components, folder)
        return Path(folder)

    def adapter_models(self) -> dict[str, torch.nn.Module]:
        """The models an adapter file may patch, by the names the files use."""
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        return models if self.text_encoder_2 is None else {**models, "text_encoder_2": self.text_encoder_2}

    def load_lora(self, path, scale: float = 1.0, strict: bool = True, *, scales: dict[str, float] | None = None):
        """Apply a LoRA / LyCORIS / diffusers-PEFT / ldm adapter file at ``scale``; several stack. Returns a
        handle (``.remove()``, ``.set_scale(s)``, ``.fuse()``). ``strict=False``: layers this model lacks are
        skipped with a warning instead of an error. (``ldm.checkpoints.adapters``)"""
        return load_adapter(self.adapter_models(), path, scale, strict, self.adapters, scales)

    def unload_lora(self) -> None:
        """Remove every adapter loaded with ``load_lora``: the base weights, bit for bit."""
        self.adapters.clear()

    def load_control(self, path, **options):
        """A ControlNet or T2I-Adapter file or diffusers folder, for ``Control(unit, image, ...)``; kind, layout and
        config come from the keys and shapes (``ldm.pipeline.control``, ``ldm.checkpoints.control``)."""
        return load_unit(self, path, **options)

class _InpaintingInput(torch.nn.Module):
    """The 9-channel inpainting U-Net's input: cat[x_t (scaled by the denoiser), mask, masked-image latents]
    along channels, in diffusers' order; the extra inputs are conditions, never noise-scaled."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x, t, context, mask, masked_latents, **residuals):
        return self.network(torch.cat([x, mask.to(x.dtype), masked_latents.to(x.dtype)], dim=1), t, context,
                            **residuals)


class _PerImage(torch.nn.Module):
    """network(x, t, **cond) evaluated on groups of at most `size` images (see batch_invariant). The batch stacks
    `blocks` copies of B images (under CFG: [uncond; cond]); a call takes consecutive images' rows, block by
    block (CFG still pairs an image's two branches), and a call of a single row is padded to two with a copy.
    What makes an image's arithmetic independent of its batch mates (measured, tests/pipeline/
    test_batch_invariance.py and scripts/bench_pipeline.py --check-invariance): CPU kernels pick their blocking,
    and with it the order of each sum, from the shapes; with the (B, C) time-embedding GEMMs run row by row
    (ldm.models.blocks.per_row) and the maps in channels-last order, SD's and the default model's U-Nets give
    each row the same bits in calls of 2 to 8 rows, wherever it sits, but not in a call of one row."""

    def __init__(self, network, blocks: int = 1, size: int = 1):
        super().__init__()
        self.network, self.blocks, self.size = network, blocks, size

    def forward(self, x, t, **cond):
        n = x.shape[0] // self.blocks
        if n * self.blocks != x.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} rows is not {self.blocks} blocks of equal size")
        if n <= self.size and x.shape[0] > 1:
            return self.network(x, t, **cond)
        outs = []
        for start in range(0, n, self.size):
            images = range(start, min(start + self.size, n))
            rows = [j * n + i for j in range(self.blocks) for i in images]
            rows = rows * 2 if len(rows) == 1 else rows
            index = torch.tensor(rows, device=x.device)
            out = self.network(x[index], t[index], **{k: v[index] for k, v in cond.items()})
            outs.append(out[:len(images) * self.blocks].unflatten(0, (self.blocks, len(images))))
        # outs[g] is (blocks, images of group g, ...): join the groups along images, then the blocks again
        return torch.cat(outs, dim=1).flatten(0, 1)


def load_pipeline(model=None, device=None, dtype=None, **kwargs) -> Pipeline:
    """The Pipeline for ``model`` (a path; None: the shipped default), the way the CLI, batch and server load
    one. Device and dtype names are checked before any weights load."""
    resolve_device(device), resolve_dtype(dtype)
    if model is None:
        return Pipeline(device=device, dtype=dtype, **kwargs)
    return Pipeline.from_pretrained(model, device=device, dtype=dtype, **kwargs)


def _load_default():
    folder = assets.DEFAULT_MODEL
    if not (folder / "model_index.json").is_file():
        raise DefaultModelMissing(
            f"the default model is not installed (expected a diffusers folder at {folder}); pass a model "
            "instead: Pipeline.from_pretrained(PATH) or `ldm generate --model PATH ...`, where PATH is an SD "
            ".safetensors/.ckpt file or a diffusers model folder")
    return load(folder)
