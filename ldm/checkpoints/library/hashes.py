"""Short hashes of weight files, as A1111 shows them, and a cache of them on disk (hashing gigabytes is slow).

    weights_hash("v1-5-pruned-emaonly.safetensors")   # "6ce0161689": A1111's "Model hash" (sha256, 10 digits)
    lora_hash("style.safetensors")                    # kohya's "addnet" hash, 12 digits: A1111's "Lora hashes"
    HashCache().get(path, "weights")                  # the same, computed once per file version

The cache is one JSON file, ``$LDM_CACHE_DIR/hashes.json`` (default ``~/.cache/ldm/hashes.json``), keyed by
the absolute path and which hash, and valid while the file's size and modification time are the ones recorded
(A1111 keeps its ``cache.json`` the same way). Written atomically; a lost update only costs a re-hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from ldm.files import write_atomic

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt"}
ENV_CACHE = "LDM_CACHE_DIR"
CACHE_FILE = "hashes.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weights_hash(path: str | os.PathLike, length: int = 10) -> str:
    """Short sha256 of a model's weights: A1111's "Model hash" for a single file (first 10 hex digits of the file's
    sha256); for a folder, the sha256 over its weight files' own sha256 digests in sorted path order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)[:length]
    files = _weight_files(path)
    if not files:
        raise ValueError(f"{path}: no weight files to hash")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return digest.hexdigest()[:length]


def lora_hash(path: str | os.PathLike, length: int = 12) -> str:
    """A1111's "Lora hashes" entry for a file: for .safetensors kohya's "addnet" hash (sha256 of the bytes after
    the header, so metadata edits keep it), else the file's sha256; the first 12 hex digits."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


HASHES = {"weights": weights_hash, "lora": lora_hash}


def _version(path: Path) -> list[int]:
    """[size, mtime_ns] of a file, or summed / latest over a folder's weight files."""
    stats = [path.stat()] if path.is_file() else [f.stat() for f in _weight_files(path)]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "ldm")
    return Path(root) / CACHE_FILE


class HashCache:
    """Hashes by (path, which), remembered in memory and in ``cache_path()``; thread-safe."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self._lock = threading.Lock()
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    @staticmethod
    def _key(path: Path, which: str) -> str:
        return f"{which}:{path.resolve()}"

    def known(self, path: Path, which: str = "weights") -> str | None:
        """The cached hash of ``path``'s current version, or None (nothing is computed)."""
        with self._lock:
            record = self._load().get(self._key(path, which))
        try:
            current = _version(path)
        except OSError:
            return None
        return record["hash"] if isinstance(record, dict) and record.get("version") == current else None

    def get(self, path: Path, which: str = "weights") -> str:
        """The hash (``HASHES[which]``), computed and recorded unless the cache knows this version already."""
        found = self.known(path, which)
        if found is not None:
            return found
        version, digest = _version(path), HASHES[which](path)
        with self._lock:
            data = self._load()
            data[self._key(path, which)] = {"version": version, "hash": digest}
            try:
                write_atomic(self.path, json.dumps(data, indent=0, sort_keys=True).encode())
            except OSError:
                pass     # a read-only cache folder: hashes are recomputed next time, nothing else is lost
        return digest
