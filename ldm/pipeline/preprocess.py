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
(bring your own control image).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# sd-webui-controlnet's canny sliders (scripts/preprocessor/legacy/preprocessor_compiled.py)
CANNY_LOW, CANNY_HIGH = 100, 200
RESOLUTION = 512          # its default "Resolution" slider: the short side the image is detected at
PAD = 64                  # resize_image_with_pad pads to a multiple of 64


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
