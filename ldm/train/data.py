"""Captioned image folders for training: discovery, checks, transforms, aspect buckets and data order.

Three layouts are read (the Hugging Face ``imagefolder`` convention for the first two):

* ``metadata.jsonl``: one JSON object per line with ``file_name`` and ``text`` or a ``captions`` list
  (one is picked at random each time the image is drawn);
* ``metadata.csv``: columns ``file_name`` and ``text``;
* otherwise every image in the folder (recursively) with a sidecar ``.txt`` caption of the same stem.

Every random choice for a sample (caption, dropout, crop, flip, augmentation, and the trainer's noise and
timestep) comes from a generator seeded by ``derive_seed(seed, step, position)``: the same global batch
gives the same samples whatever the number of processes, and resuming needs nothing but the step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.pipeline.images import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHOW_PATHS = 5   # how many offending paths an error or warning names


class DataError(ValueError):
    """A dataset that cannot be used; the message names the folder, file or line at fault."""


@dataclass
class Record:
    path: Path
    captions: list[str]
    size: tuple[int, int] = (0, 0)   # (width, height), filled in by check_images
    meta: dict = field(default_factory=dict)   # the metadata row (jsonl/csv), for data.repeats rules


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes, Python versions and runs)."""
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------------------
# discovery


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from None


def _record(root: Path, file_name, captions, where: str, meta: dict) -> Record:
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: missing 'file_name'")
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: '{file_name}' has no caption (need 'text' or a non-empty 'captions' list)")
    return Record(root / file_name, [c.strip() for c in captions], meta=meta)


def _scan_jsonl(root: Path, meta: Path) -> list[Record]:
    records = []
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{meta} is not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{meta}:{n}: expected a JSON object")
        records.append(_record(root, row.get("file_name"), row.get("captions", row.get("text")), f"{meta}:{n}", row))
    return records


def _scan_csv(root: Path, meta: Path) -> list[Record]:
    try:
        with meta.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{meta} is not valid UTF-8 (byte {e.start})") from None
    if rows and ("file_name" not in rows[0] or "text" not in rows[0]):
        raise DataError(f"{meta}: needs the columns 'file_name' and 'text', found {list(rows[0])}")
    return [_record(root, r["file_name"], r["text"], f"{meta}:{n + 2}", r) for n, r in enumerate(rows)]


def _scan_sidecars(root: Path) -> list[Record]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing[:SHOW_PATHS])
        raise DataError(f"{len(missing)} image(s) in {root} have no caption file (.txt beside the image, or a "
                        f"metadata.jsonl/metadata.csv): {names}")
    return [Record(p, [_read_caption(p.with_suffix(".txt"))]) for p in images]


def scan(root: str | Path) -> list[Record]:
    """List (image, captions) pairs in ``root``; raises DataError for a missing or empty folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / "metadata.jsonl").is_file():
        records = _scan_jsonl(root, root / "metadata.jsonl")
    elif (root / "metadata.csv").is_file():
        records = _scan_csv(root, root / "metadata.csv")
    else:
        records = _scan_sidecars(root)
    if not records:
        raise DataError(f"no captioned images in {root} (looked for metadata.jsonl, metadata.csv, or "
                        f"images with {', '.join(IMAGE_EXTENSIONS)} and .txt captions)")
    return records


def check_images(records: list[Record], strict: bool = False) -> list[Record]:
    """Open every image; unreadable ones are skipped with a warning naming a few (``strict``: DataError)."""
    good, bad = [], []
    for r in records:
        try:
            with Image.open(r.path) as im:
                im.load()
                r.size = im.size
            good.append(r)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
            if strict:
                raise DataError(f"cannot read image {r.path}: {e}") from None
            bad.append(r.path)
    if bad:
        names = ", ".join(str(p) for p in bad[:SHOW_PATHS])
        more = f" and {len(bad) - SHOW_PATHS} more" if len(bad) > SHOW_PATHS else ""
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {names}{more}", stacklevel=2)
    if not good:
        raise DataError(f"none of the {len(records)} images could be read (first: {records[0].path})")
    return good


# -------------------------------------------------------------------------------------------------------
# transforms (PIL in, tensor in [-1, 1] out)


def load_rgb(path: Path, fill=(255, 255, 255)) -> Image.Image:
    """RGB image; transparency is composited onto ``fill`` (emoji are drawn on white)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P") or "transparency" in im.info:
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, tuple(fill) + (255,))
            return Image.alpha_composite(canvas, im).convert("RGB")
        return im.convert("RGB")


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def resize_crop(img: Image.Image, size: tuple[int, int], crop: str, g: torch.Generator) -> Image.Image:
    """Scale so the image covers ``size`` = (w, h), then crop the centre or a random window."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    if crop == "random":
        left, top = round(_uniform(g) * (rw - w)), round(_uniform(g) * (rh - h))
    else:
        left, top = (rw - w) // 2, (rh - h) // 2
    return img.crop((left, top, left + w, top + h))


def identity_augment(img: Image.Image, g: torch.Generator, shift: float, scale: float, fill) -> Image.Image:
    """Shrink by a factor in [1 - scale, 1] and shift by up to ``shift`` of the side; fill the rest.

    Small enough that the subject stays whole and recognisable; it multiplies the views of each concept.
    """
    w, h = img.size
    s = 1.0 - scale * _uniform(g)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    dx = round((2 * _uniform(g) - 1) * shift * w)
    dy = round((2 * _uniform(g) - 1) * shift * h)
    canvas = Image.new("RGB", (w, h), tuple(fill))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((w - nw) // 2 + dx, (h - nh) // 2 + dy))
    return canvas


@dataclass
class Transform:
    """Pixel preprocessing for one sample; all randomness is drawn from the generator passed in."""
    crop: str = "center"
    flip: bool = False
    augment: bool = False
    shift: float = 0.08
    scale: float = 0.15
    fill: tuple[int, int, int] = (255, 255, 255)

    @property
    def is_random(self) -> bool:
        return self.crop == "random" or self.flip or self.augment

    def image(self, path: Path, size: tuple[int, int], g: torch.Generator) -> Image.Image:
        """The transformed image (RGB, ``size`` = (w, h)); the same generator state gives the same geometry
        whatever the image, so a pair (image, control image) transformed from one state stays aligned."""
        img = resize_crop(load_rgb(path, self.fill), size, self.crop, g)
        if self.augment:
            img = identity_augment(img, g, self.shift, self.scale, self.fill)
        if self.flip and _uniform(g) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __call__(self, path: Path, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
        """(3, h, w) float32 in [-1, 1]."""
        return to_tensor(self.image(path, size, g))[0]

    def fingerprint(self) -> str:
        return f"{self.crop}/{self.flip}/{self.augment}/{self.shift}/{self.scale}/{tuple(self.fill)}"


# -------------------------------------------------------------------------------------------------------
# aspect buckets and data order


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of ``step``, with w·h ≤ resolution² and aspect within [1/max_aspect, max_aspect]."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_aspect:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    buckets.add((resolution // step * step or step,) * 2)
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log ratio) to ``size`` = (w, h)."""
    r = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - r))


class DataOrder:
    """Which items form the global batch of each step: a pure function of (seed, step).

    Without buckets, the items are a stream of per-epoch permutations cut into global batches. With buckets,
    each epoch shuffles every bucket, cuts it into whole global batches (a bucket smaller than one batch is
    repeated to fill it) and shuffles the order of the batches.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, bucket_of: list[int] | None = None,
                 repeats: list[int] | None = None):
        # an item with repeats r appears r times per epoch
        self.items = [i for i in range(num_items) for _ in range(repeats[i] if repeats else 1)]
        self.n, self.batch, self.seed = len(self.items), global_batch, seed
        self.bucket_of = [bucket_of[i] for i in self.items] if bucket_of is not None else None
        self._epoch_cache: tuple[int, list] | None = None
        if bucket_of is not None:
            counts = np.bincount(np.asarray(self.bucket_of))
            self.batches_per_epoch = int(sum(max(1, c // global_batch) for c in counts if c))

    def _perm(self, epoch: int, n: int, tag: str = "") -> list[int]:
        return torch.randperm(n, generator=generator(derive_seed(self.seed, "epoch", epoch, tag))).tolist()

    def _bucket_epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        batches = []
        for b in sorted(set(self.bucket_of)):
            items = [i for i, x in enumerate(self.bucket_of) if x == b]
            items = [items[j] for j in self._perm(epoch, len(items), f"bucket{b}")]
            while len(items) < self.batch:
                items = items + items
            batches += [items[k:k + self.batch] for k in range(0, len(items) - self.batch + 1, self.batch)]
        batches = [batches[j] for j in self._perm(epoch, len(batches), "order")]
        self._epoch_cache = (epoch, batches)
        return batches

    def global_batch(self, step: int) -> list[int]:
        if self.bucket_of is not None:
            batch = self._bucket_epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]
            return [self.items[k] for k in batch]
        out = []
        for pos in range(step * self.batch, (step + 1) * self.batch):
            epoch, k = divmod(pos, self.n)
            if not self._epoch_cache or self._epoch_cache[0] != epoch:
                self._epoch_cache = (epoch, self._perm(epoch, self.n))
            out.append(self.items[self._epoch_cache[1][k]])
        return out

    def shard(self, step: int, micro: int, micro_batch: int, rank: int, world: int) -> list[tuple[int, int]]:
        """(item, sample_seed) for process ``rank``'s part of micro-step ``micro`` of ``step``."""
        items = self.global_batch(step)
        start = (micro * world + rank) * micro_batch
        return [(items[p], derive_seed(self.seed, "sample", step, p)) for p in range(start, start + micro_batch)]


# -------------------------------------------------------------------------------------------------------
# the dataset


class CaptionDataset(torch.utils.data.Dataset):
    """Indexed by ``(item, sample_seed)``; returns the caption and either pixels or cached latents.

    ``latents``: optional per-item (mean, logvar) tensors of shape (V, C, h, w) from ``ldm.latent_cache``
    (V augmented variants); then one variant is picked at random and no image is decoded. ``hints``
    (ControlNet training, ``ldm.train.control_data.Hints``): each sample also gets its control image as
    ``hint`` (uint8, (C, H, W)), cached beside the latents (a third tensor per item, (V, C, H, W)) or made here.
    """

    def __init__(self, records: list[Record], sizes: list[tuple[int, int]], transform: Transform,
                 caption_dropout: float = 0.0, latents: list[tuple[torch.Tensor, ...]] | None = None,
                 hints=None):
        self.records, self.sizes, self.transform = records, sizes, transform
        self.caption_dropout, self.latents, self.hints = caption_dropout, latents, hints

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item, seed = key
        g = generator(seed)
        r = self.records[item]
        caption = r.captions[int(torch.randint(len(r.captions), (), generator=g))]
        if _uniform(g) < self.caption_dropout:
            caption = ""
        out = {"caption": caption, "seed": derive_seed(seed, "noise")}
        if self.latents is not None:
            mean, logvar, *hint = self.latents[item]
            v = int(torch.randint(mean.shape[0], (), generator=g))
            out["latent_mean"], out["latent_logvar"] = mean[v].float(), logvar[v].float()
            if hint:
                out["hint"] = hint[0][v]
        elif self.hints is not None:
            out["pixels"], out["hint"] = self.hints(self.transform, r, self.sizes[item], g)
        else:
            out["pixels"] = self.transform(r.path, self.sizes[item], g)
        return out


def collate(samples: list[dict]) -> dict:
    out = {"caption": [s["caption"] for s in samples], "seed": [s["seed"] for s in samples]}
    for k in samples[0]:
        if k not in out:
            out[k] = torch.stack([s[k] for s in samples])
    return out


def repeats_for(records: list[Record], rules: dict[str, int]) -> list[int]:
    """Per-record repeats from ``{"field=value": n}`` rules over the metadata rows (the largest match wins)."""
    parsed = []
    for rule, n in rules.items():
        key, sep, value = rule.partition("=")
        if not sep or not key or not isinstance(n, int) or n < 1:
            raise DataError(f"data.repeats: {rule!r}: {n!r} must be 'field=value': positive integer")
        parsed.append((key, value, n))
    return [max([n for key, value, n in parsed if str(r.meta.get(key)) == value], default=1) for r in records]


@dataclass
class DataSpec:
    records: list[Record]
    sizes: list[tuple[int, int]]         # per record: target (w, h)
    buckets: list[int] | None            # per record: bucket id (aspect buckets on)
    repeats: list[int]                   # per record: draws per epoch


def build(cfg, *, size_multiple: int = 8) -> DataSpec:
    """Scan and check ``cfg.path`` (a DataConfig): records, target sizes, buckets and repeats."""
    if not cfg.path:
        raise DataError("no data folder given (--data DIR or data.path=DIR)")
    records = check_images(scan(cfg.path), strict=cfg.strict)
    repeats = repeats_for(records, cfg.repeats)
    if cfg.resolution % size_multiple:
        raise DataError(f"data.resolution={cfg.resolution} must be a multiple of {size_multiple}")
    if not cfg.buckets:
        return DataSpec(records, [(cfg.resolution, cfg.resolution)] * len(records), None, repeats)
    if cfg.bucket_step % size_multiple:
        raise DataError(f"data.bucket_step={cfg.bucket_step} must be a multiple of {size_multiple}")
    buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    ids = [assign_bucket(r.size, buckets) for r in records]
    return DataSpec(records, [buckets[i] for i in ids], ids, repeats)
