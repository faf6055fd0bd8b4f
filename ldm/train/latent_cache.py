"""VAE latents cached on disk, one small safetensors file per image.

The file name is a hash of everything the latents depend on: the image file's bytes, the VAE's weights and
config, the target size and the pixel transform (with the number of augmented variants). Changing any of
them changes the name, so stale entries are never read; they are simply recomputed under the new name.
Each entry holds ``mean`` and ``logvar`` of q(z | x) with shape (V, C, h, w) for V augmented variants, so
the trainer can still draw z ~ q(z | x) (as Rombach et al. 2022 train on samples, not means); for ControlNet
training also ``hint``, each variant's control image (``ldm.train.control_data.Hints``), uint8 (V, C, H, W).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.train.data import Record, Transform, derive_seed, generator

BATCH_IMAGES = 32   # pixel images per VAE call while filling the cache


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of the VAE's weights (and config, when it has one)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(getattr(vae, "config", "")).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def entry_key(path: Path, vae_id: str, size: tuple[int, int], transform: Transform, variants: int,
              extra: str = "") -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(path.read_bytes())
    h.update(f"|{vae_id}|{size}|{transform.fingerprint()}|{variants}".encode())
    if extra:
        h.update(f"|{extra}".encode())
    return h.hexdigest()


class LatentCache:
    """Encode what is missing, then hand out per-item (mean, logvar) tensors."""

    def __init__(self, folder: str | Path, vae: torch.nn.Module, transform: Transform, variants: int = 1,
                 hints=None):
        self.folder = Path(folder)
        self.vae, self.transform, self.hints = vae, transform, hints
        self.variants = variants if transform.is_random else 1
        self.vae_id = vae_fingerprint(vae)

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def _encode(self, items: list[tuple[Record, tuple[int, int], str]]) -> None:
        """Encode the variants of several images (all of one size) in one batch; write one file per image."""
        pixels, hints = [], []
        for record, size, key in items:
            seed = int(key[:15], 16)
            for v in range(self.variants):
                g = generator(derive_seed(seed, v))
                if self.hints is None:
                    pixels.append(self.transform(record.path, size, g))
                else:
                    x, hint = self.hints(self.transform, record, size, g)
                    pixels.append(x)
                    hints.append(hint)
        param = next(self.vae.parameters())
        dist = self.vae.encode(torch.stack(pixels).to(param.device, param.dtype))
        means, logvars = dist.mean.float().cpu().split(self.variants), dist.logvar.float().cpu().split(self.variants)
        hints = torch.stack(hints).split(self.variants) if hints else [None] * len(items)
        for (_, _, key), mean, logvar, hint in zip(items, means, logvars, hints):
            target = self._file(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tensors = {"mean": mean.contiguous(), "logvar": logvar.contiguous()}
            if hint is not None:
                tensors["hint"] = hint.contiguous()
            save_file(tensors, str(tmp))
            os.replace(tmp, target)   # atomic: a reader sees the whole entry or none

    def prepare(self, records: list[Record], sizes: list[tuple[int, int]], *, rank: int = 0, world: int = 1,
                barrier=None, progress: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Encode the missing entries (process ``rank`` takes every ``world``-th) and load them all: per item
        (mean, logvar), and its hints when the cache makes them."""
        keys = [entry_key(r.path, self.vae_id, s, self.transform, self.variants,
                          self.hints.fingerprint(r) if self.hints is not None else "") for r, s in zip(records, sizes)]
        todo = [i for i in range(rank, len(records), world) if not self._file(keys[i]).is_file()]
        if todo:
            from tqdm.auto import tqdm
            todo.sort(key=lambda i: sizes[i])           # batches of one size
            per_batch = max(1, BATCH_IMAGES // self.variants)
            with tqdm(total=len(todo), desc="caching latents", disable=not progress) as bar:
                start = 0
                while start < len(todo):
                    chunk = [todo[start]]
                    while len(chunk) < per_batch and start + len(chunk) < len(todo) \
                            and sizes[todo[start + len(chunk)]] == sizes[chunk[0]]:
                        chunk.append(todo[start + len(chunk)])
                    self._encode([(records[i], sizes[i], keys[i]) for i in chunk])
                    bar.update(len(chunk))
                    start += len(chunk)
        if barrier is not None:
            barrier()
        out = []
        for k in keys:
            t = load_file(str(self._file(k)))
            out.append((t["mean"], t["logvar"], t["hint"]) if self.hints is not None else (t["mean"], t["logvar"]))
        return out
