"""The server's image files: ``DATA/images/JOB/N.png`` plus a crash-safe manifest per job, and the inputs
(init image, mask) of img2img jobs in ``DATA/inputs/``.

Writes reuse batch's machinery: each PNG goes through ``ldm.files`` (atomic rename, fsync) and only then is
recorded in ``JOB/manifest.jsonl`` by ``ldm.batch.manifest.ManifestWriter``; an image counts as finished when
its record exists and the file still has the recorded sha256 (a torn last record is skipped and the image made
again, with the same bytes). File names are built here from a job id (32 hex digits, checked) and an image
number, never from anything a URL carries.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from PIL import Image

from ldm.batch.manifest import ManifestWriter, read_records
from ldm.files import remove_temporaries
from ldm.pipeline.png_info import GenerationInfo, read_png_info, save_png

JOB_ID = re.compile(r"[0-9a-f]{32}")
IMAGE_ID = re.compile(r"([0-9a-f]{32})-(\d{1,4})")


class ImageStore:
    def __init__(self, folder: str | Path):
        self.root = Path(folder)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "inputs").mkdir(parents=True, exist_ok=True)

    def job_folder(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "images" / job_id

    def path(self, job_id: str, index: int) -> Path:
        return self.job_folder(job_id) / f"{int(index)}.png"

    # ------------------------------------------------------------------ inputs of img2img / inpaint jobs
    def save_inputs(self, job_id: str, init: Image.Image | None, mask: Image.Image | None,
                    controls: list[Image.Image] = ()) -> None:
        """Store the decoded inputs (init image, mask, ControlNet unit images) losslessly before the job is
        queued, so a restart redraws from the same pixels (the worker always reads them back from here)."""
        self.job_folder(job_id)  # checks the id
        parts = {"init": init, "mask": mask, **{f"control{i}": c for i, c in enumerate(controls)}}
        for part, image in parts.items():
            if image is not None:
                save_png(image, self.root / "inputs" / f"{job_id}-{part}.png")

    def remove_inputs(self, job_id: str) -> None:
        self.job_folder(job_id)
        for path in (self.root / "inputs").glob(f"{job_id}-*.png"):
            path.unlink(missing_ok=True)

    def control_images(self, job_id: str, count: int) -> list[Image.Image]:
        self.job_folder(job_id)
        return [_load(self.root / "inputs" / f"{job_id}-control{i}.png") for i in range(count)]

    def inputs(self, job_id: str) -> tuple[Image.Image, Image.Image | None]:
        self.job_folder(job_id)
        mask_path = self.root / "inputs" / f"{job_id}-mask.png"
        init = _load(self.root / "inputs" / f"{job_id}-init.png")
        return init, (_load(mask_path) if mask_path.exists() else None)

    # ------------------------------------------------------------------ results
    def finished(self, job_id: str) -> set[int]:
        """Image numbers whose PNG is durably in place with the bytes its manifest record names."""
        folder = self.job_folder(job_id)
        if folder.exists():
            remove_temporaries(folder)  # what a killed writer left
        done = set()
        for record in read_records(folder / "manifest.jsonl"):
            index = record.get("index")
            if isinstance(index, int) and _sha256(self.path(job_id, index)) == record.get("sha256"):
                done.add(index)
        return done

    def write(self, job_id: str, index: int, image: Image.Image) -> None:
        """The PNG (its metadata from ``image.info``) atomically, then its manifest record."""
        path = save_png(image, self.path(job_id, index))
        data = path.read_bytes()
        with ManifestWriter(path.parent / "manifest.jsonl") as manifest:
            manifest.append({"job": job_id, "index": index, "file": path.name,
                             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    def read(self, job_id: str, index: int) -> bytes:
        return self.path(job_id, index).read_bytes()

    def info(self, job_id: str, index: int) -> GenerationInfo:
        return read_png_info(self.path(job_id, index))


def parse_image_id(text: str) -> tuple[str, int] | None:
    """``JOB-N`` (the only form an image URL takes) -> (job id, image number), else None."""
    match = IMAGE_ID.fullmatch(text)
    return (match.group(1), int(match.group(2))) if match else None


def image_id(job_id: str, index: int) -> str:
    return f"{job_id}-{index}"


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
