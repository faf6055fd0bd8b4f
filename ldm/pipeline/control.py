"""Image control of the one Pipeline: ControlNets, T2I-Adapters and IP-Adapters (docs/control.md).

    unit = pipe.load_control("control_v11p_sd15_canny.safetensors")      # kind and config from the keys
    images = pipe("a house", control=[Control(unit, edges, scale=0.8, start=0.0, end=1.0)])

A ControlNet (Zhang et al. 2023) runs beside the U-Net at every step and adds its residuals to the U-Net's
skips and middle block; several ControlNets sum theirs. A T2I-Adapter (Mou et al. 2023) turns its image into
feature maps once per image; they are added inside the U-Net's down levels at every step. Both act only during
the steps i (of N) with start <= i/N and (i+1)/N <= end, diffusers' ``control_guidance_start/end`` rule (for an
adapter with start 0 that is diffusers' ``adapter_conditioning_factor`` = end).

How it rides the pipeline's pieces: the control images (and an adapter's features) are extra conditions of every
U-Net call, one row per image, so classifier-free guidance duplicates them for both branches (as diffusers'
``prepare_image`` does) and batch-invariant micro-batching (``core._PerImage``) hands each image its own rows;
the step index travels the same way (``control_step``, from σ, so that samplers evaluating between steps
act with the step they are in), and so does which rows are classifier-free guidance's unconditional branch
(``control_uncond``). ``_Controlled`` wraps the network: it runs the active units on exactly the rows the U-Net
gets, then the U-Net with the residuals (``UNet.forward``'s diffusers-named keywords). An IP-Adapter's image tokens
are computed once per request and ride at the end of the context into the U-Net's cross-attention layers, which
``ldm.models.ip_adapter.install`` wraps for the duration of the request.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.control import CONTROLNET, T2I_ADAPTER, load_control
from ldm.checkpoints.ip_adapter import IP_ADAPTER, check_encoder, load_image_encoder
from ldm.checkpoints.library import resolve_file
from ldm.denoiser import batch_sigma
from ldm.models.controlnet import ControlNet
from ldm.models.conv import pack_for_inference
from ldm.models.ip_adapter import IPState, install, uninstall
from ldm.models.t2i_adapter import T2IAdapter
from ldm.pipeline import images as img
from ldm.pipeline.preprocess import check_preprocessing, preprocessor_info, source_image

MASKED = -1.0   # a control image's value for "no information here" (the inpainting ControlNet's masked pixels)
HINT, FEATURE, STEP, UNCOND = "control_hint_", "control_feature_", "control_step", "control_uncond"
IP_TOKENS, IP_NEGATIVE = "control_ip_", "control_ipneg_"     # an IP-Adapter's image tokens, and the "no image" ones
# A1111's control modes (sd-webui-controlnet's ControlMode; its API sends the label or the index)
MODES = {"balanced": "balanced", "prompt": "prompt", "control": "control", "Balanced": "balanced",
         "My prompt is more important": "prompt", "ControlNet is more important": "control",
         0: "balanced", 1: "prompt", 2: "control"}
# A1111's soft injection ("prompt" and "control" modes): residual i of n weighted 0.825^(n-1-i) (the shallow
# skips least, the middle block fully); an adapter's features by these factors
SOFT_DECAY, SOFT_ADAPTER = 0.825, (0.25, 0.62, 0.825, 1.0)
# the SDXL U-Net's extra conditions, which a ControlNet copy of it takes too
_ADDED = ("text_embeds", "time_ids")


@dataclass(frozen=True)
class ControlModel:
    """A loaded ControlNet, T2I-Adapter or IP-Adapter: what ``Pipeline.load_control`` returns."""

    model: torch.nn.Module
    kind: str                      # "ControlNet", "T2I-Adapter" or "IP-Adapter"
    name: str | None = None        # the file's stem or the folder's name (PNG metadata); None if built in memory
    image_encoder: Any = None      # IP-Adapter: (CLIPVisionModelWithProjection, CLIPImageProcessor)

    def __repr__(self) -> str:
        return f"ControlModel({self.kind}, {self.name or 'in memory'})"


def _as_model(model) -> ControlModel:
    if isinstance(model, ControlModel):
        return model
    if isinstance(model, ControlNet):
        return ControlModel(model, CONTROLNET)
    if isinstance(model, T2IAdapter):
        return ControlModel(model, T2I_ADAPTER)
    raise ValueError(f"Control.model must be what pipe.load_control returns (or a ControlNet / T2IAdapter), got "
                     f"{type(model).__name__}")


@dataclass(frozen=True)
class Control:
    """One control unit of a request: a loaded model, its image, its weight and the fraction of the steps it acts
    in. ``image``: a PIL image, a path, or a float array/tensor in [0, 1] of shape (H, W, 3) (or (H, W));
    resized to the request's size (PIL: Lanczos; arrays: nearest, as diffusers' image processor does).
    ``mode``: A1111's control mode: "balanced" (default), "prompt" (My prompt is more important: the residuals
    weighted down toward the shallow levels), "control" (ControlNet is more important: those weights, and the
    unconditional branch of classifier-free guidance gets no control). ``guess``: diffusers' guess mode for a
    ControlNet (residuals weighted 0.1 .. 1 from shallow to deep, the unconditional branch without control).
    ``module``: a preprocessor that makes the control image from ``image`` (A1111's names: "none", "canny";
    ``ldm.pipeline.preprocess``), run at short side ``processor_res`` (None: the request's own pixels) with its
    ``threshold_a``/``threshold_b`` (canny: low/high; None: 100/200); ``resize_mode``: A1111's "Just Resize"
    (default), "Crop and Resize" or "Resize and Fill" (or 0/1/2). All of these are recorded in the PNG."""

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    guess: bool = False
    module: str = "none"
    resize_mode: str = "Just Resize"
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "model", _as_model(self.model))
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Control.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"Control.start and Control.end must satisfy 0 <= start <= end <= 1, got "
                             f"start={self.start}, end={self.end}")
        if self.image is None:
            raise ValueError("Control.image is required (a PIL image, a path, or an (H, W, 3) array in [0, 1])")
        mode = MODES.get(self.mode) if isinstance(self.mode, (str, int)) and not isinstance(self.mode, bool) else None
        if mode is None:
            raise ValueError(f"Control.mode must be 'balanced', 'prompt' or 'control' (or A1111's label or index), "
                             f"got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        if not isinstance(self.guess, bool):
            raise ValueError(f"Control.guess must be True or False, got {self.guess!r}")
        if self.guess and self.model.kind != CONTROLNET:
            raise ValueError("Control.guess applies to ControlNets only")
        check_preprocessing(self)

    def active(self, step: int, steps: int) -> bool:
        """Whether the unit acts at step ``step`` of ``steps`` (diffusers' control_guidance_start/end rule)."""
        return self.start <= step / steps and (step + 1) / steps <= self.end


def as_controls(control) -> list[Control]:
    """``control=`` of a request: None, one Control, or a list of them."""
    if control is None:
        return []
    controls = [control] if isinstance(control, Control) else list(control) if isinstance(control, (list, tuple)) \
        else None
    if controls is None or not all(isinstance(c, Control) for c in controls):
        raise ValueError("control must be a Control or a list of Controls (from ldm import Control)")
    return controls


def prepare_image(image, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """(1, channels, height, width) float32 in [0, 1] from a PIL image, path or [0, 1] array/tensor (H, W[, C])."""
    if isinstance(image, (str, os.PathLike)):
        image = img.load_image(image, "control image")
    if isinstance(image, Image.Image):
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.reshape(height, width, -1)).permute(2, 0, 1)[None]
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image.detach().cpu())
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x[..., None] if x.ndim == 2 else x
        if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"control image array must be (H, W, 3) or (H, W), got shape {tuple(x.shape)}")
        x = x.float()[..., :3]
        if not (((x >= 0) & (x <= 1)) | (x == MASKED)).all():   # NaN fails both
            raise ValueError("control image array must hold finite values in [0, 1] (or -1: masked, for the "
                             "inpainting ControlNet)")
        x = x.permute(2, 0, 1)[None]
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width))
        if x.shape[1] != channels:
            x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    else:
        raise ValueError(f"control image must be a PIL image, a path or an (H, W, 3) array in [0, 1], got "
                         f"{type(image).__name__}")
    return x.contiguous()


def inpaint_condition(image, mask) -> np.ndarray:
    """The control image of SD's inpainting ControlNet (control_v11p_sd15_inpaint): the image in [0, 1] with the
    pixels to repaint (mask >= 0.5) set to -1, as diffusers' examples make it; (H, W, 3) float32."""
    source = img.load_image(image, "image")
    array = np.asarray(source, dtype=np.float32) / 255.0
    repaint = img.load_mask(mask, source.size)[0, 0].numpy() >= 0.5
    array[repaint] = MASKED
    return array


def _place(unit: ControlModel, device: torch.device, dtype: torch.dtype) -> None:
    """Move a unit to the pipeline's device and dtype, unless it is there (a lean ControlNet would unpack)."""
    model = unit.model
    if unit.kind != CONTROLNET or (model.dtype, model.device) != (dtype, device):
        model.to(device=device, dtype=dtype)
    if unit.image_encoder is not None:
        unit.image_encoder[0].to(device=device, dtype=dtype)


def ip_tokens(unit: ControlModel, image, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An IP-Adapter's image tokens (1, n, D) for ``image``, and for no image: the projection of zero embeddings
    (base) or of the encoder's states for an all-zero input (Plus, Full-face), as diffusers' encode_image."""
    encoder, processor = unit.image_encoder
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    pixels = processor(images=img.load_image(image, "IP-Adapter image"), return_tensors="pt").pixel_values
    pixels = pixels.to(device, dtype)
    if unit.model.config.hidden_states:
        pos, neg = (encoder(p, output_hidden_states=True).hidden_states[-2]
                    for p in (pixels, torch.zeros_like(pixels)))
    else:
        pos = encoder(pixels).image_embeds
        neg = torch.zeros_like(pos)
    return unit.model.tokens(pos), unit.model.tokens(neg)


def _channels(unit: ControlModel) -> int:
    model = unit.model
    return model.config.conditioning_channels if unit.kind == CONTROLNET else model.config.in_channels


class _Controlled(torch.nn.Module):
    """network(x, t, context, **cond) with the control units' residuals (see the module docstring). cond carries
    ``control_hint_i`` (ControlNet i's image) or ``control_feature_i_k`` (adapter i's k-th feature map), one row
    per U-Net row, and ``control_step`` (the sampler's step of each row)."""

    def __init__(self, network, controls: list[Control], steps: int, ip_state: IPState | None = None):
        super().__init__()
        self.network, self.controls, self.steps, self.ip_state = network, controls, steps, ip_state

    def _ip(self, i: int, control: Control, rows, uncond: torch.Tensor, inputs: dict):
        """An IP-Adapter's tokens for each row (the "no image" ones on the unconditional rows, as diffusers) and
        its weight (0 where it does not act)."""
        pos, neg = inputs[f"{IP_TOKENS}{i}"], inputs[f"{IP_NEGATIVE}{i}"]
        tokens = torch.where(uncond.view(-1, 1, 1), neg, pos)
        weight = 0.0 if rows is None else control.scale if rows is True else control.scale * rows.view(-1, 1, 1)
        return tokens, weight

    def _rows(self, control: Control, step: torch.Tensor, uncond: torch.Tensor, like: torch.Tensor):
        """Which rows the unit acts on: True (all), None (none) or a (rows, 1, 1, 1) 0/1 mask: the rows whose step
        lies in its window, less the unconditional ones where its mode leaves them without control."""
        acts = [control.active(int(s), self.steps) for s in step.tolist()]
        if control.mode == "control" or control.guess:
            acts = [a and not u for a, u in zip(acts, uncond.tolist())]
        if not any(acts):
            return None
        return True if all(acts) else torch.tensor(acts, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)

    @staticmethod
    def _weights(control: Control, n: int, adapter: bool) -> list:
        """The unit's factor for each of its n outputs (residuals: the skips', then the middle block's)."""
        if control.guess:   # diffusers' guess mode: logspace(-1, 0) over the residuals, times the scale
            return list(torch.logspace(-1, 0, n) * control.scale)
        if control.mode == "balanced":
            return [control.scale] * n
        if adapter:
            return [control.scale * w for w in (*SOFT_ADAPTER, *[1.0] * n)[:n]]
        return [control.scale * SOFT_DECAY ** float(n - 1 - i) for i in range(n)]

    def forward(self, x, t, context, **cond):
        step, uncond = cond.pop(STEP), cond.pop(UNCOND)
        inputs = {k: cond.pop(k) for k in list(cond) if k.startswith((HINT, FEATURE, IP_TOKENS, IP_NEGATIVE))}
        added = {k: cond[k] for k in _ADDED if k in cond}
        down = mid = features = None
        ip_tokens, ip_weights = [], []
        for i, control in enumerate(self.controls):
            rows = self._rows(control, step, uncond, x)
            if control.model.kind == IP_ADAPTER:
                tokens, weight = self._ip(i, control, rows, uncond, inputs)
                ip_tokens.append(tokens)
                ip_weights.append(weight)
                continue
            if rows is None:
                continue
            if control.model.kind == CONTROLNET:
                d, m = control.model.model(x, t, context, inputs[f"{HINT}{i}"], **added)
                out = [r * w for r, w in zip([*d, m], self._weights(control, len(d) + 1, False))]
                out = out if rows is True else [r * rows for r in out]
                down = out[:-1] if down is None else [a + b for a, b in zip(down, out[:-1])]
                mid = out[-1] if mid is None else mid + out[-1]
            else:
                f = [inputs[f"{FEATURE}{i}_{k}"] for k in range(self._features(i, inputs))]
                f = [r * w for r, w in zip(f, self._weights(control, len(f), True))]
                f = f if rows is True else [r * rows for r in f]
                features = f if features is None else [a + b for a, b in zip(features, f)]
        if down is not None:
            cond.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if features is not None:
            cond["down_intrablock_additional_residuals"] = features
        if ip_tokens:   # the image tokens ride at the end of the context (ldm.models.ip_adapter.IPAttention)
            self.ip_state.weights, self.ip_state.tokens = ip_weights, [tok.shape[1] for tok in ip_tokens]
            context = torch.cat([context, *(tok.to(context.dtype) for tok in ip_tokens)], dim=1)
        return self.network(x, t, context, **cond)

    @staticmethod
    def _features(i: int, inputs: dict) -> int:
        return sum(1 for k in inputs if k.startswith(f"{FEATURE}{i}_"))


class _StepOf:
    """D(x, σ, **cond) -> D(x, σ, control_step=i, control_uncond=u, **cond): i the step whose interval
    [σ_{i+1}, σ_i] holds σ; u marks the rows of classifier-free guidance's unconditional branch (the first half
    of a call of twice the request's batch, ldm.guidance.classifier_free)."""

    def __init__(self, denoiser, sigmas: torch.Tensor, batch: int):
        self.denoiser, self.batch = denoiser, batch
        self.sigmas = sigmas[:-1].double()

    def __call__(self, x, sigma, **cond):
        s = batch_sigma(sigma, x).double().cpu()
        step = (self.sigmas[None, :] >= s[:, None] * (1 - 1e-6)).sum(1).sub(1).clamp(min=0)
        uncond = torch.arange(x.shape[0]) < (self.batch if x.shape[0] == 2 * self.batch else 0)
        return self.denoiser(x, sigma, **cond, **{STEP: step.to(x.device), UNCOND: uncond.to(x.device)})


class ActiveControls:
    """The units of one request, while it runs: wraps the pipeline's network and denoiser (core.Pipeline.denoiser)."""

    def __init__(self, controls: list[Control], sigmas: torch.Tensor, batch: int, ip_state: IPState | None = None):
        self.controls, self.sigmas, self.batch, self.ip_state = controls, sigmas, batch, ip_state

    def network(self, network):
        return _Controlled(network, self.controls, len(self.sigmas) - 1, self.ip_state)

    def denoiser(self, denoiser):
        return _StepOf(denoiser, self.sigmas, self.batch)


def check_units(pipe, controls: list[Control]) -> None:
    """Each unit fits this pipeline (a model loaded for another pipeline is refused here, before any work)."""
    cfg = pipe.unet.config
    for i, control in enumerate(controls):
        model, kind = control.model.model, control.model.kind
        if kind == CONTROLNET:
            fits = model.config.unet.per_level("cross_attention_dim") == cfg.per_level("cross_attention_dim") \
                and model.config.unet.in_channels == pipe.latent_channels
        elif kind == T2I_ADAPTER:
            fits = model.config.feature_channels()[:cfg.levels] == cfg.block_out_channels
        else:
            fits = model.config.context_dim == cfg.per_level("cross_attention_dim")[0]
        if not fits:
            raise ValueError(f"control[{i}]: {control.model} does not fit this pipeline's U-Net")


@contextlib.contextmanager
def controlling(pipe, control, req, sigmas: torch.Tensor):
    """While a request runs: the pipeline's denoiser carries the units; yields the extra conditions (one row per
    image) to pass to ``guided_denoiser``."""
    controls = as_controls(control)
    if not controls:
        yield {}
        return
    check_units(pipe, controls)
    extra = {}
    with torch.no_grad():
        for i, c in enumerate(controls):
            _place(c.model, pipe.device, pipe.dtype)
            if c.model.kind == IP_ADAPTER:   # once per request, on one row (the same bits whatever the batch)
                pos, neg = ip_tokens(c.model, c.image, pipe.device, pipe.dtype)
                extra[f"{IP_TOKENS}{i}"] = pos.expand(req.batch, -1, -1)
                extra[f"{IP_NEGATIVE}{i}"] = neg.expand(req.batch, -1, -1)
                continue
            hint = prepare_image(source_image(c, req.width, req.height), req.height, req.width, _channels(c.model))
            hint = hint.to(pipe.device, pipe.dtype)
            if c.model.kind == CONTROLNET:
                extra[f"{HINT}{i}"] = hint.expand(req.batch, -1, -1, -1)
                continue
            # once per image, on its one row: every image's features are the same bits whatever the batch
            for k, feature in enumerate(c.model.model(hint)):
                extra[f"{FEATURE}{i}_{k}"] = feature.expand(req.batch, *feature.shape[1:])
    adapters = [c.model.model for c in controls if c.model.kind == IP_ADAPTER]
    state = IPState(adapters) if adapters else None
    previous = pipe._controls, pipe._network
    pipe._controls = ActiveControls(controls, sigmas, req.batch, state)
    if getattr(pipe, "backend", "torch") != "torch":   # a whole-graph backend's U-Net takes no residuals
        pipe._network = pipe.unet
    placed = install(pipe.unet, state) if state is not None else []
    try:
        yield extra
    finally:
        uninstall(placed)
        pipe._controls, pipe._network = previous


class NeedsImageEncoder(ValueError):
    """An IP-Adapter loaded without its image encoder."""


# A1111's labels of the control modes, as sd-webui-controlnet writes them into the infotext
MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "control": "ControlNet is more important"}


def control_info(control) -> dict[str, str]:
    """The units of a request as sd-webui-controlnet records them in A1111's infotext: ``ControlNet i`` ->
    "Module: canny, Model: NAME, Weight: ..., Resize Mode: ..., [Processor Res: ..., Threshold A: ..., Threshold
    B: ...,] Guidance Start: ..., Guidance End: ..., Control Mode: ..." (module "none": the image given was the
    control image)."""
    info = {}
    for i, c in enumerate(as_controls(control)):
        module = "ip-adapter" if c.model.kind == IP_ADAPTER and c.module == "none" else c.module
        info[f"ControlNet {i}"] = (f"Module: {module}, Model: {c.model.name or c.model.kind}, Weight: {c.scale}, "
                                   f"Resize Mode: {c.resize_mode}, {preprocessor_info(c)}Guidance Start: {c.start}, "
                                   f"Guidance End: {c.end}, Control Mode: {MODE_LABELS[c.mode]}"
                                   + (", Guess Mode: True" if c.guess else ""))
    return info


def load_unit(pipe, path, image_encoder=None) -> ControlModel:
    """``Pipeline.load_control``: a ControlNet / T2I-Adapter / IP-Adapter file or folder, checked against the
    pipeline's U-Net; an IP-Adapter with its CLIP image encoder (a transformers folder). A name that is not a path
    is looked up in the pipeline's models folder (``ldm.checkpoints.library``)."""
    path = resolve_file("controlnet", path, getattr(pipe, "library", None))
    model = load_control(path, pipe.unet, dtype=pipe.dtype, latent_factor=pipe.vae_scale_factor)
    model.to(device=pipe.device, dtype=pipe.dtype)
    kind = CONTROLNET if isinstance(model, ControlNet) else T2I_ADAPTER if isinstance(model, T2IAdapter) \
        else IP_ADAPTER
    if kind == IP_ADAPTER:
        if image_encoder is None:
            raise NeedsImageEncoder(f"{path}: an IP-Adapter needs its image encoder: pipe.load_control(path, "
                             "image_encoder=FOLDER), a transformers CLIPVisionModelWithProjection folder")
        encoder = load_image_encoder(image_encoder, pipe.dtype)
        check_encoder(path, model, encoder[0])
        return ControlModel(model, kind, path.stem if path.is_file() else path.name, encoder)
    if image_encoder is not None:
        raise ValueError(f"{path}: a {kind}, which takes no image_encoder (that is for IP-Adapters)")
    if kind == CONTROLNET and pipe.lean:   # runs every step: one (packed) copy of its weights, as the U-Net
        pack_for_inference(model)
    return ControlModel(model, kind, path.stem if path.is_file() else path.name)
