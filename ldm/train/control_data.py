"""Control images for ControlNet training: each sample's own, or canny edges of its image.

A dataset gives them as diffusers' ``train_controlnet.py`` takes them: a ``conditioning_image`` field (the name is
``controlnet.column``) in ``metadata.jsonl`` / ``metadata.csv`` naming a file relative to the data folder. The control
image goes through the same crop, augmentation and flip as its image (the same generator state: the geometry does
not depend on the pixels), with black where augmentation fills, as an edge or depth map has. A dataset without
that field gets canny edges of each (transformed) image (``ldm.pipeline.preprocess.canny``), computed once per
cached variant beside its latents, or per sample when latents are not cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.pipeline.images import to_tensor
from ldm.pipeline.preprocess import canny
from ldm.train.data import SHOW_PATHS, DataError, Record, Transform

BLACK = (0, 0, 0)


def _uint8(image: Image.Image, channels: int) -> torch.Tensor:
    """(channels, H, W) uint8 of a PIL image (canny's edges are grey: one channel is kept)."""
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1).contiguous()


@dataclasses.dataclass
class Hints:
    """``hints(transform, record, size, g) -> (pixels in [-1, 1] (3, H, W), hint uint8 (C, H, W))``.

    ``files``: per record path, its control image (None: canny of the image, thresholds ``low``/``high``)."""

    files: dict[Path, Path] | None = None
    low: int = 100
    high: int = 200

    @classmethod
    def for_records(cls, records: list[Record], root, column: str, low: int, high: int) -> "Hints":
        """Control images from ``column`` of the metadata rows when the dataset has it (every row must, and every
        file must open), else canny of each image."""
        named = [r for r in records if r.meta.get(column)]
        if not named:
            return cls(None, low, high)
        if len(named) != len(records):
            missing = [str(r.path) for r in records if not r.meta.get(column)][:SHOW_PATHS]
            raise DataError(f"{len(records) - len(named)} of {len(records)} images in {root} have no '{column}' "
                            f"(give every image its control image, or none and let canny make them): "
                            f"{', '.join(missing)}")
        files = {r.path: Path(root) / str(r.meta[column]) for r in records}
        for image, control in files.items():
            try:
                with Image.open(control) as im:
                    im.load()
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
                raise DataError(f"cannot read the control image {control} (the '{column}' of {image}): {e}") from None
        return cls(files, low, high)

    @property
    def channels(self) -> int:
        return 1 if self.files is None else 3

    def fingerprint(self, record: Record) -> str:
        """What a record's hints depend on, for the latent cache's key."""
        if self.files is None:
            return f"canny/{self.low}/{self.high}"
        return "file/" + hashlib.blake2b(self.files[record.path].read_bytes(), digest_size=16).hexdigest()

    def __call__(self, transform: Transform, record: Record, size: tuple[int, int], g: torch.Generator):
        state = g.get_state()
        image = transform.image(record.path, size, g)
        if self.files is None:
            hint = canny(image, self.low, self.high)
        else:
            same = torch.Generator().set_state(state)
            hint = dataclasses.replace(transform, fill=BLACK).image(self.files[record.path], size, same)
        return to_tensor(image)[0], _uint8(hint, self.channels)
