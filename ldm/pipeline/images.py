"""Images and masks in and out of the pipeline: paths / PIL / arrays <-> tensors in [-1, 1].

Every loader checks its input before any model runs and names the offending file or value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an (H, W, 3) array (uint8, or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{what} {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{what} {str(path)!r} is not a readable image ({type(e).__name__})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{what} array must be (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(image[..., :3])
    raise ValueError(f"{what} must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def load_mask(mask: ImageInput, size: tuple[int, int]) -> torch.Tensor:
    """A (1, 1, H, W) float mask in [0, 1] (white = 1 = repaint) that must have the image's size (W, H)."""
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        values = mask.astype(np.float64)
        values = values / 255.0 if mask.dtype == np.uint8 else np.clip(values, 0.0, 1.0)
        found = (mask.shape[1], mask.shape[0])
    else:
        gray = load_image(mask, "mask").convert("L")
        values, found = np.asarray(gray, dtype=np.float64) / 255.0, gray.size
    if tuple(found) != tuple(size):
        raise ValueError(f"mask is {found[0]}x{found[1]} but the image is {size[0]}x{size[1]}; they must match")
    return torch.from_numpy(values).float()[None, None]


def check_size(height: int, width: int, multiple: int = 8) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            raise ValueError(f"{name}={value} is not a multiple of {multiple}; try {max(multiple, value // multiple * multiple)}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def to_unit(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1] (diffusers' postprocessing)."""
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(unit: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images, rounding as diffusers does."""
    return [Image.fromarray(a) for a in (unit * 255).round().astype(np.uint8)]
