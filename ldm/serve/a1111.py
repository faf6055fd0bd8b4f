"""AUTOMATIC1111's web-UI API, mapped onto ldm: request fields -> ``JobSpec``, results -> A1111's responses.

Written from A1111's documented request schema (``/docs`` of a running web UI), not from its code. Real clients
(webuiapi, editor plugins) send the whole schema with every request, so the rules are:

* fields ldm serves are checked (type and range) and answer 422 naming the field when wrong;
* fields A1111 itself would ignore for this request (``hr_*`` without ``enable_hr``, ``denoising_strength`` in
  txt2img, ``save_images``, ``styles`` ldm has none of, an empty ``alwayson_scripts``) are ignored;
* fields that would change the image in ways ldm cannot (``enable_hr: true``, ``restore_faces``, ``tiling``,
  variation seeds, scripts) are refused with 422 rather than silently drawing something else;
* ``eta`` is applied only to samplers that take one (A1111 sends ``eta`` with every sampler and uses it for DDIM
  and the ancestral ones).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import json
import time
from typing import Any

from PIL import Image

from ldm.pipeline.png_info import (A1111_SAMPLERS, A1111_SCHEDULES, JSON_KEY, PARAMETERS_KEY, SCHEDULE_LABELS,
                                   GenerationInfo, info_from_parameters, parse_parameters)
from ldm.samplers import SAMPLERS
from ldm.serve.spec import FieldError, JobSpec, random_seed

# ldm option -> A1111 field (the names a FieldError reports)
NAMES = {"guidance": "cfg_scale", "sampler": "sampler_name", "num": "batch_size", "strength": "denoising_strength",
         "spacing": "scheduler", "model": "override_settings.sd_model_checkpoint"}
# Fields that change the image in ways ldm does not reproduce: refused when "on" (truthy).
UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "subseed_strength", "script_name")   # alwayson_scripts:
# only ControlNet's (ldm.serve.controlnet refuses the others)
# A1111's scheduler names (modules/sd_schedulers.py) where they are not ldm's spacing names.
A1111_SCHEDULER_NAMES = {"ays": "align_your_steps"}
# A1111 scheduler names and labels, lower case -> ldm spacing (None: the model's own timesteps).
SCHEDULERS = {"automatic": None, "uniform": None, **{k: k for k in A1111_SCHEDULES},
              **{label.lower(): k for k, label in A1111_SCHEDULES.items()},
              **{name: k for k, name in A1111_SCHEDULER_NAMES.items()}}
SAMPLER_BY_LABEL = {label.lower(): name for name, label in A1111_SAMPLERS.items() if name in SAMPLERS}
MAX_IMAGE_BYTES = 32 << 20  # one base64 image's decoded size


def samplers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's names for the samplers this ldm has, ldm's name as an alias."""
    return [{"name": A1111_SAMPLERS[name], "aliases": [name], "options": {}}
            for name in SAMPLERS if name in A1111_SAMPLERS]


def schedulers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: the schedule types ldm can apply."""
    labels = {"automatic": "Automatic", "uniform": "Uniform",
              **{A1111_SCHEDULER_NAMES.get(k, k): label for k, label in A1111_SCHEDULES.items()}}
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in labels.items()]


def sampler_from(name: Any, scheduler: Any) -> tuple[str, str | None]:
    """(ldm sampler, spacing) for A1111's ``sampler_name`` + ``scheduler`` (also the old "DPM++ 2M Karras")."""
    if not isinstance(name, str):
        raise FieldError("sampler_name", f"sampler_name must be a string, got {json.dumps(name)}")
    text, spacing = name.strip(), None
    for schedule, label in A1111_SCHEDULES.items():
        if text.endswith(" " + label):
            text, spacing = text[: -len(label) - 1], schedule
    sampler = SAMPLER_BY_LABEL.get(text.lower()) or (text if text in SAMPLERS else None)
    if sampler is None:
        known = ", ".join(s["name"] for s in samplers())
        raise FieldError("sampler_name", f"unknown sampler_name {name!r}; this server has {known}")
    if scheduler is not None:  # "Automatic" keeps what the sampler name said
        key = str(scheduler).strip().lower()
        if key not in SCHEDULERS:
            raise FieldError("scheduler", f"scheduler {scheduler!r} is not available; use Automatic, Uniform, "
                                          f"{', '.join(A1111_SCHEDULES.values())}")
        spacing = spacing if key == "automatic" else SCHEDULERS[key]
    return sampler, spacing


def _get(body: dict[str, Any], key: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok and kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        label = {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(kind, str(kind))
        raise FieldError(key, f"{key} must be {label}, got {json.dumps(value)[:60]}")
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key in UNSUPPORTED:
        if body.get(key):
            raise FieldError(key, f"{key}={json.dumps(body[key])[:60]} is not supported by ldm serve")


def spec_from_txt2img(body: Any, defaults: dict[str, Any], mode: str = "txt2img") -> JobSpec:
    """A1111 ``StableDiffusionTxt2ImgProcessingAPI`` (the fields ldm serves) -> JobSpec."""
    if not isinstance(body, dict):
        raise FieldError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    _refuse_unsupported(body)
    seed = _get(body, "seed", int, -1)
    if seed < -1:
        raise FieldError("seed", f"seed must be -1 (random) or >= 0, got {seed}")
    sampler, spacing = sampler_from(body.get("sampler_name") or body.get("sampler_index")
                                    or defaults.get("sampler", "dpmpp_2m"), body.get("scheduler"))
    eta = float(_get(body, "eta", float, 0.0))
    if "eta" not in inspect.signature(SAMPLERS[sampler]).parameters:
        eta = 0.0  # A1111 sends eta with every sampler; only DDIM and the ancestral/SDE ones use it
    elif eta < 0:
        raise FieldError("eta", f"eta must be >= 0, got {eta}")
    counts = {}
    for key in ("batch_size", "n_iter"):
        counts[key] = _get(body, key, int, 1)
        if counts[key] < 1:
            raise FieldError(key, f"{key} must be an integer >= 1, got {counts[key]}")
    override = _get(body, "override_settings", dict, {})    # of A1111's settings, the model is the one ldm takes
    steps = _get(body, "steps", int, None)
    if steps is not None and steps < 1:
        raise FieldError("steps", f"steps must be an integer >= 1, got {steps}")
    return JobSpec(
        prompt=_get(body, "prompt", str, ""), negative_prompt=_get(body, "negative_prompt", str, ""),
        seed=random_seed() if seed == -1 else seed, steps=steps, guidance=_get(body, "cfg_scale", float, None),
        sampler=sampler, spacing=spacing, eta=eta, width=_get(body, "width", int, None),
        height=_get(body, "height", int, None), batch_size=counts["batch_size"], n_iter=counts["n_iter"],
        mode=mode, api="a1111", names=NAMES, model=_get(override, "sd_model_checkpoint", str, None))


def decode_image(value: Any, key: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP, with or without a ``data:image/...;base64,`` prefix -> an RGB(A) PIL image."""
    if not isinstance(value, str) or not value:
        raise FieldError(key, f"{key} must be a base64-encoded image")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise FieldError(key, f"{key} is over {MAX_IMAGE_BYTES >> 20} MB")
    try:
        data = base64.b64decode(text, validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise FieldError(key, f"{key} is not a readable base64 image ({e})") from None
    return image


def spec_from_img2img(body: Any, defaults: dict[str, Any]) -> tuple[JobSpec, Image.Image, Image.Image | None]:
    """A1111 ``StableDiffusionImg2ImgProcessingAPI`` -> (JobSpec, init image, mask or None). A mask makes it an
    inpainting job (white = repaint; ``inpainting_mask_invert: 1`` swaps)."""
    if not isinstance(body, dict):
        raise FieldError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    images = _get(body, "init_images", list, None)
    if not images:
        raise FieldError("init_images", "init_images must hold one base64 image")
    init = decode_image(images[0], "init_images").convert("RGB")
    mask = decode_image(body["mask"], "mask").convert("L") if body.get("mask") else None
    if mask is not None and _get(body, "inpainting_mask_invert", int, 0):
        mask = mask.point(lambda v: 255 - v)
    strength = float(_get(body, "denoising_strength", float, 0.75))
    if not 0.0 <= strength <= 1.0:
        raise FieldError("denoising_strength", f"denoising_strength must be in [0, 1], got {strength}")
    spec = spec_from_txt2img(body, defaults, mode="inpaint" if mask is not None else "img2img")
    spec.strength = strength
    return spec, init, mask


def parameters(body: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """A1111's ``parameters``: the request as the server understood it (sent fields, resolved values)."""
    resolved = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
                "steps": spec.steps, "cfg_scale": spec.guidance, "width": spec.width, "height": spec.height,
                "sampler_name": A1111_SAMPLERS.get(spec.sampler, spec.sampler),
                "scheduler": SCHEDULE_LABELS.get(spec.spacing or "", "Automatic"), "batch_size": spec.batch_size,
                "n_iter": spec.n_iter, "eta": spec.eta or None}
    if spec.strength is not None:
        resolved["denoising_strength"] = spec.strength
    sent = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {**sent, **resolved, **({"init_images": None, "mask": None} if spec.mode != "txt2img" else {})}


def info(spec: JobSpec, infos: list[GenerationInfo], model: dict[str, Any]) -> str:
    """A1111's ``info``: a JSON string with the seeds and one infotext per image."""
    first = infos[0] if infos else None
    return json.dumps({
        "prompt": spec.prompt, "all_prompts": [i.prompt for i in infos],
        "negative_prompt": spec.negative_prompt, "all_negative_prompts": [i.negative_prompt for i in infos],
        "seed": first.seed if first else spec.seed, "all_seeds": [i.seed for i in infos],
        "subseed": -1, "all_subseeds": [-1] * len(infos), "subseed_strength": 0,
        "width": spec.width, "height": spec.height, "sampler_name": A1111_SAMPLERS.get(spec.sampler, spec.sampler),
        "cfg_scale": spec.guidance, "steps": spec.steps, "batch_size": spec.batch_size, "n_iter": spec.n_iter,
        "restore_faces": False, "sd_model_name": model["model_name"], "sd_model_hash": model["hash"],
        "sd_vae_name": first.vae if first else None, "sd_vae_hash": first.vae_hash if first else None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": spec.strength,
        "extra_generation_params": {k: v for k, v in (first.extra if first else {}).items()
                                    if k.startswith("ControlNet ")},   # as sd-webui-controlnet's infotext
        "index_of_first_image": 0, "infotexts": [i.to_parameters() for i in infos],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": first.clip_skip if first else None,
        "is_using_inpainting_conditioning": spec.mode == "inpaint", "version": "ldm",
    })


def sd_vae(pipe) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-vae``: the VAEs a client may pick, as A1111 lists its models/VAE folder (file name and
    path): the one ``--vae`` swapped in, or none (the model's own VAE, A1111's "Automatic")."""
    loaded = getattr(pipe, "vae_file", None)
    if loaded is None or pipe.vae is not loaded.vae:
        return []
    return [{"model_name": loaded.name, "filename": str(loaded.path)}]


def vae_option(pipe) -> str:
    """A1111's ``sd_vae`` option: the swapped-in VAE's name, or "Automatic" (the model's own)."""
    return next((v["model_name"] for v in sd_vae(pipe)), "Automatic")


def check_vae_option(pipe, wanted: Any) -> None:
    """A client may set ``sd_vae`` to what is served (or "Automatic": A1111's default, which clients send back);
    anything else is refused, naming the field (the server does not switch VAEs per request)."""
    if wanted is None or wanted in ("Automatic", vae_option(pipe)):
        return
    raise FieldError("sd_vae", f"sd_vae {wanted!r}: this server decodes with {vae_option(pipe)!r} "
                               "(start it with --vae PATH for another)")


def png_info(image: Image.Image) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: A1111's ``info``/``items``/``parameters``, plus ``ldm``: the settings as ldm
    reads them (its JSON chunk, else the infotext mapped onto ldm's names; null when the PNG has neither)."""
    text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    infotext = text.get(PARAMETERS_KEY, "")
    settings = None
    try:
        if JSON_KEY in text:
            settings = GenerationInfo.from_dict(json.loads(text[JSON_KEY]))
        elif infotext:
            settings = info_from_parameters(infotext)
    except (ValueError, TypeError):
        settings = None
    return {"info": infotext, "items": {k: v for k, v in text.items() if k != PARAMETERS_KEY},
            "parameters": parse_parameters(infotext) if infotext else {},
            "ldm": None if settings is None else json.loads(settings.to_json())}
