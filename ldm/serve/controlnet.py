"""sd-webui-controlnet's API on ``ldm serve``: units in ``alwayson_scripts``, and its ``/controlnet/*`` routes.

Written from the extension's API (scripts/api.py, internal_controlnet/args.py: ``ControlNetUnit``'s fields and
defaults) and checked with webuiapi's ``ControlNetUnit``. A txt2img/img2img request carries units as
``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` (the script's name in any case, as A1111 matches
it); a unit is an object with ``enabled`` (default true), ``module``, ``model`` (a name of ``--control-dir``:
"stem" or the listed "stem [hash]"), ``weight`` (0..2), ``image`` (base64; img2img: the init image when
absent), ``guidance_start``/``guidance_end``, ``control_mode`` (0/1/2 or the labels), ``resize_mode`` (0/1/2 or
the labels), ``processor_res``, ``threshold_a``/``threshold_b`` (out of the module's slider range, -1
included: the module's default, as the extension does) and ``pixel_perfect`` (the preprocessor runs at the
request's own pixels). A bad unit is a 422 naming ``alwayson_scripts.controlnet.args[i].FIELD``.

Durable jobs: the job's spec records each unit (``JobSpec.control``: the model's path and its A1111 hash, the
numbers) and the unit images are stored losslessly beside the job's other inputs before it is queued, so a
restarted server redraws the same image.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from PIL import Image

from ldm.pipeline.control import MODES, check_units
from ldm.batch.control_units import ControlFiles, UnitSpec, a1111_hash, loader_for
from ldm.pipeline.preprocess import (MODULES, RESOLUTION, available_modules, depth, get_module, preprocess,
                                     resize_mode)
from ldm.serve.a1111 import decode_image
from ldm.serve.spec import FieldError, JobSpec

API_VERSION = 3          # external_code.get_api_version()
MAX_UNITS = 8
SCRIPT = "controlnet"
# A1111 fields a unit may carry that change nothing ldm draws (UI state, memory hints, hires-fix choice)
IGNORED = ("low_vram", "hr_option", "is_ui", "input_mode", "batch_images", "output_dir", "loopback",
           "save_detected_map", "inpaint_crop_input_image", "union_control_type", "pulid_mode")
KNOWN = ("enabled", "module", "model", "weight", "image", "mask", "resize_mode", "processor_res", "threshold_a",
         "threshold_b", "guidance_start", "guidance_end", "control_mode", "pixel_perfect", "guessmode",
         "effective_region_mask", "advanced_weighting", "ipadapter_input", *IGNORED)


def _field(i: int, name: str) -> str:
    return f"alwayson_scripts.{SCRIPT}.args[{i}].{name}"


def _number(unit: dict, i: int, name: str, default: float, low: float, high: float) -> float:
    value = unit.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(_field(i, name), f"{_field(i, name)} must be a number, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise FieldError(_field(i, name), f"{_field(i, name)} must be in [{low}, {high}], got {value}")
    return float(value)


def _slider(module: str, index: int, value: Any) -> float | None:
    """A processor_res / threshold value as sd-webui-controlnet's ``bound_check_params`` takes it: outside the
    module's slider (-1 too), the module's default (None: ldm's default for it)."""
    sliders = MODULES[module].sliders
    if index >= len(sliders) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    slider = sliders[index]
    return float(value) if slider["min"] <= value <= slider["max"] else float(slider["value"])


def scripts_other_than_controlnet(scripts: Any) -> list[str]:
    """The names of ``alwayson_scripts`` entries ldm cannot run (those with arguments; an empty ``args`` is what
    clients send for an extension they do not use)."""
    if not isinstance(scripts, dict):
        raise FieldError("alwayson_scripts", "alwayson_scripts must be an object {script name: {args: [...]}}")
    return [name for name, value in scripts.items() if name.lower() != SCRIPT
            and (not isinstance(value, dict) or value.get("args"))]


def parse_units(body: dict, files: ControlFiles, init: Image.Image | None = None
                ) -> tuple[list[dict], list[Image.Image]]:
    """The enabled units of a request: (one ``UnitSpec`` dict per unit, model resolved to its path, plus its
    A1111 hash; the unit images). FieldError naming the unit and field."""
    scripts = body.get("alwayson_scripts") or {}
    other = scripts_other_than_controlnet(scripts)
    if other:
        raise FieldError("alwayson_scripts", f"alwayson_scripts {', '.join(map(repr, other))}: ldm serve runs "
                                             f"only the ControlNet script")
    entry = next((v for k, v in scripts.items() if k.lower() == SCRIPT), None) or {}
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise FieldError(f"alwayson_scripts.{SCRIPT}.args", f"alwayson_scripts.{SCRIPT}.args must be a list of units")
    specs, images = [], []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise FieldError(_field(i, "unit"), f"alwayson_scripts.{SCRIPT}.args[{i}] must be an object")
        if unit.get("enabled", True) is False:
            continue
        if len(specs) == MAX_UNITS:
            raise FieldError(_field(i, "enabled"), f"at most {MAX_UNITS} enabled ControlNet units")
        spec, image = _unit(unit, i, files, init)
        specs.append(spec)
        images.append(image)
    return specs, images


def _unit(unit: dict, i: int, files: ControlFiles, init: Image.Image | None) -> tuple[dict, Image.Image]:
    unknown = sorted(set(unit) - set(KNOWN))
    if unknown:
        raise FieldError(_field(i, unknown[0]), f"{_field(i, unknown[0])}: not a ControlNet unit field")
    for name in ("mask", "effective_region_mask", "advanced_weighting", "ipadapter_input"):
        if unit.get(name):
            raise FieldError(_field(i, name), f"{_field(i, name)} is not supported by ldm serve")
    try:
        module = get_module(unit.get("module") or "none").name
        if module not in available_modules():
            depth(Image.new("RGB", (8, 8)))   # says what the module needs
    except ValueError as e:
        raise FieldError(_field(i, "module"), f"{_field(i, 'module')}: {e}") from None
    model = unit.get("model")
    if not isinstance(model, str) or model in ("", "None"):
        raise FieldError(_field(i, "model"), f"{_field(i, 'model')}: name a model of /controlnet/model_list")
    try:
        path = files.resolve(model, _field(i, "model"))
    except ValueError as e:
        raise FieldError(_field(i, "model"), str(e)) from None
    start = _number(unit, i, "guidance_start", 0.0, 0.0, 1.0)
    end = _number(unit, i, "guidance_end", 1.0, 0.0, 1.0)
    if start > end:
        raise FieldError(_field(i, "guidance_end"), f"{_field(i, 'guidance_end')} {end} is below guidance_start "
                                                    f"{start}")
    mode = unit.get("control_mode", unit.get("guessmode") or 0)
    if not isinstance(mode, (str, int)) or isinstance(mode, bool) or mode not in MODES:
        raise FieldError(_field(i, "control_mode"), f"{_field(i, 'control_mode')} must be 0, 1, 2 or Balanced, My "
                                                    f"prompt is more important, ControlNet is more important; got "
                                                    f"{json.dumps(mode)[:40]}")
    try:
        fit = resize_mode(unit.get("resize_mode", "Crop and Resize"))
    except ValueError as e:
        raise FieldError(_field(i, "resize_mode"), f"{_field(i, 'resize_mode')}: {e}") from None
    image = _image(unit.get("image"), i, init)
    res = None if unit.get("pixel_perfect") else _slider(module, 0, unit.get("processor_res", RESOLUTION))
    spec = UnitSpec(model=str(path.resolve()), weight=_number(unit, i, "weight", 1.0, 0.0, 2.0), start=start,
                    end=end, module=module, mode=MODES[mode], resize_mode=fit,
                    processor_res=None if res is None or module == "none" else int(res),
                    threshold_a=_slider(module, 1, unit.get("threshold_a")),
                    threshold_b=_slider(module, 2, unit.get("threshold_b")))
    return {**spec.to_dict(), "hash": a1111_hash(path)}, image


def _image(value: Any, i: int, init: Image.Image | None) -> Image.Image:
    """A unit's image: base64, or ``{"image": base64, "mask": ...}`` (the extension's older form); the init
    image of img2img when none is given, as the extension does."""
    if isinstance(value, dict):
        value = value.get("image")
    if value in (None, ""):
        if init is None:
            raise FieldError(_field(i, "image"), f"{_field(i, 'image')} is required (a base64 image)")
        return init
    return decode_image(value, _field(i, "image")).convert("RGB")


# ---------------------------------------------------------------------- the worker's side
def controls(pipe, spec: JobSpec, images: list[Image.Image]) -> list:
    """The job's units as Controls for ``pipe`` (the images from the job's stored inputs)."""
    loader = loader_for(pipe)
    out = []
    for i, (record, image) in enumerate(zip(spec.control, images)):
        path = Path(record["model"])
        if not path.exists():
            raise ValueError(f"{_field(i, 'model')}: {path} is gone")
        values = {k: v for k, v in record.items() if k != "hash"}
        out.append(UnitSpec(**values).control(loader.load(path, _field(i, "model")), image))
    return out


def check_controls(pipe, spec: JobSpec, images: list[Image.Image]) -> None:
    """Load the job's control models for ``pipe`` (once) and check that they fit its U-Net: FieldError naming
    the unit's model field otherwise (blocking: call it off the event loop)."""
    for i in range(len(spec.control)):
        try:
            check_units(pipe, controls(pipe, dataclasses.replace(spec, control=spec.control[i:i + 1]),
                                       images[i:i + 1]))
        except (ValueError, OSError) as e:
            message = " ".join(str(e).split())
            raise FieldError(_field(i, "model"), message if _field(i, "model") in message
                             else f"{_field(i, 'model')}: {message}") from None


async def attach(server, body: dict, spec: JobSpec, inputs: tuple | None) -> tuple[JobSpec, tuple | None]:
    """A checked A1111 spec with the request's units (``spec.control``) and the job's inputs with their images
    (init, mask, unit images); the models are loaded for the job's pipeline and checked against it."""
    init = inputs[0] if inputs is not None else None
    specs, images = await asyncio.to_thread(parse_units, body, server.control_files, init)
    if not specs:
        return spec, inputs
    spec = dataclasses.replace(spec, control=specs)
    models = getattr(server, "models", None)     # a server that switches models (ldm.serve.models)
    pipe = models.get(spec.model, server.pipe) if models is not None else server.pipe
    await asyncio.to_thread(check_controls, pipe, spec, images)
    init, mask = inputs if inputs is not None else (None, None)
    return spec, (init, mask, images)


# ---------------------------------------------------------------------- routes
def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def module_list() -> dict[str, Any]:
    """``GET /controlnet/module_list``: the modules and their sliders (the extension's ``module_detail``)."""
    names = available_modules()
    return {"module_list": names, "module_detail": {name: {"model_free": MODULES[name].model_free,
                                                           "sliders": list(MODULES[name].sliders)} for name in names}}


def detect(body: Any) -> dict[str, Any]:
    """``POST /controlnet/detect``: run a module on images (``controlnet_input_images``, or webuiapi's
    ``controlnet_images``), at ``controlnet_processor_res`` with ``controlnet_threshold_a/b``."""
    if not isinstance(body, dict):
        raise FieldError("body", "the request body must be a JSON object")
    try:
        module = get_module(body.get("controlnet_module", "none")).name
    except ValueError as e:
        raise FieldError("controlnet_module", str(e)) from None
    key = "controlnet_input_images" if "controlnet_input_images" in body else "controlnet_images"
    images = body.get(key) or []
    if not isinstance(images, list) or not images:
        raise FieldError(key, f"{key} must hold at least one base64 image")
    res = _slider(module, 0, body.get("controlnet_processor_res", -1)) if module != "none" else None
    a = _slider(module, 1, body.get("controlnet_threshold_a", -1))
    b = _slider(module, 2, body.get("controlnet_threshold_b", -1))
    out = []
    for n, value in enumerate(images):
        image = decode_image(value, f"{key}[{n}]").convert("RGB")
        try:
            out.append(_png_base64(preprocess(module, image, None if res is None else int(res), a, b)))
        except ValueError as e:
            raise FieldError(key, f"{key}[{n}]: {e}") from None
    return {"images": out, "info": "Success"}


def controlnet_routes(app: FastAPI, server, body_reader) -> None:
    """The extension's routes; ``server.control_files``: the models of ``--control-dir``."""
    files = server.control_files = ControlFiles(getattr(server.settings, "control_dir", None), allow_paths=False)

    @app.get("/controlnet/version")
    async def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    async def model_list(update: bool = True) -> dict[str, Any]:
        return {"model_list": await asyncio.to_thread(files.titles)}

    @app.get("/controlnet/module_list")
    async def modules(alias_names: bool = False) -> dict[str, Any]:
        return module_list()

    @app.get("/controlnet/settings")
    async def settings() -> dict[str, Any]:
        return {"control_net_unit_count": MAX_UNITS}

    @app.post("/controlnet/detect")
    async def detect_route(request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(detect, await body_reader(request))
