"""Reading and writing tensor files safely: safetensors, ``torch.load(weights_only=True)``, atomic writes (``ldm.files``).

Nothing here unpickles code: ``.ckpt`` / ``.bin`` files go through PyTorch's weights-only unpickler, which
refuses any global outside a small allow-list of tensor and container types, and we report what it refused.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from ldm.files import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# safetensors dtype names -> bytes per element (safetensors format spec, github.com/huggingface/safetensors)
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_HEADER_LIMIT = 100_000_000                      # the safetensors library's own cap on header size


class CheckpointError(ValueError):
    """A file or folder that is not a loadable checkpoint; the message names the file and what is wrong."""


def error_list(items: list[str], limit: int = 12) -> str:
    """Indented lines for at most ``limit`` items, then how many more there are."""
    lines = [f"    {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


class TensorHeader:
    """Names, shapes and dtypes of the tensors in a file, read without loading them (safetensors)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], metadata: dict[str, str]):
        self.shapes, self.dtypes, self.metadata = shapes, dtypes, metadata


def read_safetensors_header(path: Path) -> TensorHeader:
    """Parse and validate a safetensors header: 8-byte little-endian length, JSON, then the data buffer,
    which must be exactly covered by the tensors' offsets (so a truncated file is caught here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header claims {length} bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, end = {}, {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            numel = 1
            for n in shape:
                numel *= int(n)
            if stop - start != numel * _ELEMENT_BYTES[dtype]:
                raise ValueError("data size does not match shape")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r} ({exc})") from None
        shapes[name], dtypes[name], end = shape, dtype, max(end, stop)
    if 8 + length + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt: the header describes {8 + length + end} bytes, "
                              f"the file has {size}")
    return TensorHeader(shapes, dtypes, metadata)


def _unpickler_detail(exc: Exception) -> str:
    """The first line of what torch's weights-only unpickler said after its boilerplate."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return line.split(". ", 1)[0]


def load_pickle(path: Path) -> dict:
    """torch.load(weights_only=True) of a .ckpt/.bin; a pickle that would run code is refused unrun."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: its pickle calls {', '.join(refused)}, which could run code. ldm only "
                "reads plain tensors (torch.load(weights_only=True)); convert the file to .safetensors with a "
                "tool you trust") from None
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint (weights-only unpickler: "
                              f"{_unpickler_detail(exc)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({_unpickler_detail(exc)})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):    # PyTorch Lightning nesting
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_safetensors(path, what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a missing or unreadable file is a CheckpointError naming
    the path and ``what`` it was meant to be."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as exc:   # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or pickle-format file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        read_safetensors_header(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickle(path)
    raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; "
                          f"expected .safetensors or one of {PICKLE_SUFFIXES}")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    from safetensors.torch import save_file

    out, seen = {}, set()
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen:      # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    tensors = out
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
