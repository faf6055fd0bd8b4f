"""Control-image preprocessors ("modules" in A1111's sd-webui-controlnet): a photo in, a control image out.

    from ldm.pipeline.preprocess import canny, preprocess
    edges = canny(photo)                                   # white edges on black, the photo's size
    edges = preprocess("canny", photo, resolution=512)     # as sd-webui-controlnet's "canny" module runs it

``canny`` is OpenCV's Canny detector (``cv2.Canny``, Canny 1986) on the RGB image, thresholds 100 / 200, as
lllyasviel's ``annotator/canny`` and sd-webui-controlnet's ``canny`` module call it. ``preprocess`` adds what that
module does around it (scripts/preprocessor/legacy/processor.py: ``resize_image_with_pad``): the image is scaled
so that its short side is the processor resolution (cubic up, area down), padded to a multiple of 64 by
repeating its edge pixels, detected, and cropped back. ``MODULES`` lists the modules by their A1111 names, with
their sliders as the extension's ``/controlnet/module_list`` describes them; "none" passes the image through
(bring your own control image); "depth" runs a transformers depth-estimation model from a local folder
(``depth``; ``$LDM_DEPTH_MODEL``), never a download. ``control_image`` is what a ``Control`` with a ``module`` runs: the image fitted
to the request's aspect by A1111's resize mode, then the module at its processor resolution.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# sd-webui-controlnet's canny sliders (scripts/preprocessor/legacy/preprocessor_compiled.py)
CANNY_LOW, CANNY_HIGH = 100, 200
RESOLUTION = 512          # its default "Resolution" slider: the short side the image is detected at
PAD = 64                  # resize_image_with_pad pads to a multiple of 64
# sd-webui-controlnet's ResizeMode (scripts/enums.py): its API sends the label or the index
RESIZE_MODES = {"Just Resize": "Just Resize", "Crop and Resize": "Crop and Resize",
                "Resize and Fill": "Resize and Fill",
                "Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill",
                0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}


def _cv2():
    try:
        import cv2
    except ImportError:  # a core dependency; a broken install should say what to do
        raise ImportError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _threshold(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 255 * 4:
        raise ValueError(f"canny {name} threshold must be a number in [0, 1020], got {value!r}")
    return int(round(value))


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Canny edges of ``image`` (any PIL mode; RGB is detected on all three channels, as OpenCV does for colour
    input): an RGB image of the same size, white (255) edges on black (0)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"canny takes a PIL image, got {type(image).__name__}")
    low, high = _threshold("low", low), _threshold("high", high)
    if low > high:
        raise ValueError(f"canny low threshold {low} is above the high threshold {high}")
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    edges = _cv2().Canny(pixels, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), "RGB")


DEPTH_ENV = "LDM_DEPTH_MODEL"   # the depth module's model folder when none is passed
_estimators: dict[Path, object] = {}
_estimators_lock = threading.Lock()


def depth(image: Image.Image, model_dir: str | os.PathLike | None = None) -> Image.Image:
    """A depth map of ``image`` by a transformers depth-estimation model from a local folder (DPT / MiDaS, Depth
    Anything, ...: ``model_dir``, else ``$LDM_DEPTH_MODEL``; nothing is downloaded): transformers' depth-estimation
    pipeline's map (near is bright), min-max scaled to 0..255, as an RGB image of the image's size."""
    folder = model_dir or os.environ.get(DEPTH_ENV)
    if not folder:
        raise ValueError(f"the depth preprocessor needs a transformers depth-estimation model folder (DPT, Depth "
                         f"Anything, ...): depth(image, model_dir=DIR), ${DEPTH_ENV}, or ldm generate --depth-model "
                         "DIR; nothing is downloaded")
    path = Path(folder).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"depth model folder {str(folder)!r} has no config.json (a transformers model folder)")
    with _estimators_lock:
        if path not in _estimators:
            from transformers import pipeline

            _estimators[path] = pipeline("depth-estimation", model=str(path))
    return _estimators[path](image.convert("RGB"))["depth"].convert("RGB")


def available_modules() -> list[str]:
    """The modules that can run here (depth only with a model folder in ``$LDM_DEPTH_MODEL``)."""
    return [name for name in MODULES if name != "depth" or os.environ.get(DEPTH_ENV)]


def _at_resolution(image: Image.Image, resolution: int | None, detect: Callable[[Image.Image], Image.Image]):
    """sd-webui-controlnet's ``resize_image_with_pad``: detect at short side ``resolution`` (None: as given) on an
    edge-padded canvas, and crop the padding off again."""
    if resolution is None:
        return detect(image)
    cv2 = _cv2()
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w = pixels.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(round(h * k)), int(round(w * k))
    pixels = cv2.resize(pixels, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(pixels, [[0, -th % PAD], [0, -tw % PAD], [0, 0]], mode="edge")
    return detect(Image.fromarray(padded)).crop((0, 0, tw, th))


@dataclass(frozen=True)
class Module:
    """One preprocessor: ``run(image, a, b)`` with A1111's two threshold sliders (None: the defaults)."""

    name: str
    run: Callable[[Image.Image, float | None, float | None], Image.Image]
    sliders: tuple[dict, ...] = ()       # A1111's slider descriptions (name, value, min, max, step)
    model_free: bool = False             # sd-webui-controlnet's "needs no ControlNet model" flag

    def __call__(self, image: Image.Image, resolution: int | None = None, threshold_a: float | None = None,
                 threshold_b: float | None = None) -> Image.Image:
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                       or not 64 <= resolution <= 4096):
            raise ValueError(f"processor resolution must be an integer in [64, 4096], got {resolution!r}")
        if self.name == "none":
            return image
        return _at_resolution(image, resolution, lambda im: self.run(im, threshold_a, threshold_b))


def _slider(name: str, value: float, low: float, high: float, step: float = 1) -> dict:
    return {"name": name, "value": value, "min": low, "max": high, "step": step}


_RESOLUTION_SLIDER = _slider("Resolution", RESOLUTION, 64, 2048, 8)
MODULES: dict[str, Module] = {
    "none": Module("none", lambda image, a, b: image),
    "canny": Module("canny", lambda image, a, b: canny(image, CANNY_LOW if a is None else a,
                                                       CANNY_HIGH if b is None else b),
                    (_RESOLUTION_SLIDER, _slider("Canny Low Threshold", CANNY_LOW, 1, 255),
                     _slider("Canny High Threshold", CANNY_HIGH, 1, 255))),
    "depth": Module("depth", lambda image, a, b: depth(image), (_RESOLUTION_SLIDER,)),
}


def get_module(name: str) -> Module:
    """A preprocessor by its A1111 name (case-insensitive); an unknown name lists the known ones."""
    module = MODULES.get(str(name).strip().lower()) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"unknown preprocessor {name!r}; ldm has {', '.join(MODULES)}")
    return module


def preprocess(name: str, image: Image.Image, resolution: int | None = None, threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """Run the preprocessor ``name`` ("none", "canny") on ``image``; ``resolution``: detect at that short side
    and return the image at it (sd-webui-controlnet's processor_res; None: at the image's own size);
    ``threshold_a/b``: the module's sliders (canny: low, high)."""
    return get_module(name)(image, resolution, threshold_a, threshold_b)


def resize_mode(value) -> str:
    """A1111's resize mode (label, alias or index) -> its label; anything else is a ValueError listing them."""
    mode = RESIZE_MODES.get(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if mode is None:
        raise ValueError(f"resize mode must be 'Just Resize' (0), 'Crop and Resize' (1) or 'Resize and Fill' (2), "
                         f"got {value!r}")
    return mode


def fit(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """The image at (width, height) by A1111's resize mode (sd-webui-controlnet's ``detectmap_proc``): "Just
    Resize" stretches it; "Crop and Resize" scales it to cover and crops the middle; "Resize and Fill" scales it
    to fit inside and fills the rest with the median of its border pixels. Lanczos throughout."""
    mode = resize_mode(mode)
    image = image.convert("RGB")
    if mode == "Just Resize" or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
    k = (max if mode == "Crop and Resize" else min)(width / image.width, height / image.height)
    w, h = max(1, int(round(image.width * k))), max(1, int(round(image.height * k)))
    scaled = image.resize((w, h), Image.Resampling.LANCZOS)
    if mode == "Crop and Resize":
        left, top = max(0, (w - width) // 2), max(0, (h - height) // 2)
        return scaled.crop((left, top, left + width, top + height))
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in np.median(border, axis=0)))
    canvas.paste(scaled, ((width - w) // 2, (height - h) // 2))
    return canvas


def control_image(image: Image.Image, module: str, width: int, height: int, mode: str = "Just Resize",
                  resolution: int | None = None, threshold_a: float | None = None,
                  threshold_b: float | None = None) -> Image.Image:
    """A photo -> the control image of a request of (width, height), in sd-webui-controlnet's order: ``module``
    run on the photo at short side ``resolution`` (None: A1111's "pixel perfect", the scale the photo is drawn
    at), then the detected map fitted to (width, height) by the resize ``mode``."""
    mode = resize_mode(mode)
    module = get_module(module)
    if module.name != "none":
        if resolution is None:
            k = (min if mode == "Resize and Fill" else max)(width / image.width, height / image.height)
            resolution = max(1, int(round(min(image.width, image.height) * k)))
        image = _at_resolution(image, resolution, lambda im: module.run(im, threshold_a, threshold_b))
    return fit(image, mode, width, height)


# ---------------------------------------------------------------------- a Control's preprocessing fields
def _optional_number(control, name: str, integer: bool = False):
    value = getattr(control, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and value != int(value)):
        raise ValueError(f"Control.{name} must be {'an integer' if integer else 'a finite number'} or None, "
                         f"got {value!r}")
    return int(value) if integer else float(value)


def check_preprocessing(control) -> None:
    """Check (and normalise, on the frozen dataclass) a Control's module, resize_mode, processor_res and
    thresholds. An IP-Adapter's image goes to its own image encoder: its module is only a label
    (sd-webui-controlnet's "ip-adapter_clip_*")."""
    def put(name, value):
        object.__setattr__(control, name, value)

    if not isinstance(control.module, str):
        raise ValueError(f"Control.module must be a preprocessor name, got {control.module!r}")
    if control.model.kind == "IP-Adapter":
        put("module", control.module.strip() or "none")
    else:
        try:
            put("module", get_module(control.module).name)
        except ValueError as e:
            raise ValueError(f"Control.module: {e}") from None
    try:
        put("resize_mode", resize_mode(control.resize_mode))
    except ValueError as e:
        raise ValueError(f"Control.resize_mode: {e}") from None
    put("processor_res", _optional_number(control, "processor_res", integer=True))
    if control.processor_res is not None and not 64 <= control.processor_res <= 4096:
        raise ValueError(f"Control.processor_res must be in [64, 4096], got {control.processor_res}")
    for name in ("threshold_a", "threshold_b"):
        put(name, _optional_number(control, name))


def preprocessor_info(control) -> str:
    """The infotext fields of a unit's preprocessor ("Processor Res: 512, Threshold A: 100, ..., "), A1111's
    names; empty for the module "none"."""
    if control.module not in MODULES or control.module == "none":
        return ""
    module = MODULES[control.module]
    defaults = [s["value"] for s in module.sliders[1:3]] + [None, None]
    res = -1 if control.processor_res is None else control.processor_res   # -1: the request's pixels
    a = defaults[0] if control.threshold_a is None else control.threshold_a
    b = defaults[1] if control.threshold_b is None else control.threshold_b
    return f"Processor Res: {res}, " + "".join(f"Threshold {k}: {float(v)}, " for k, v in (("A", a), ("B", b))
                                               if v is not None)


def source_image(control, width: int, height: int):
    """The image a ControlNet / T2I-Adapter unit hands the network: its own image when it needs no preprocessing
    (the module "none", "Just Resize"), else ``control_image`` of it."""
    if control.module == "none" and control.resize_mode == "Just Resize":
        return control.image
    from ldm.pipeline.images import load_image

    return control_image(load_image(control.image, "control image"), control.module, width, height,
                         control.resize_mode, control.processor_res, control.threshold_a, control.threshold_b)
