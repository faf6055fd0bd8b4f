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
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.files import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# safetensors dtype names -> bytes per element (safetensors format spec, github.com/huggingface/safetensors)
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                 "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
_READ_CHUNK = 1 << 30                            # Linux returns at most ~2 GiB from one read()
# the dtype tensors are read into: one for all, a function of the tensor's name, or None (as stored)
DtypeChoice = torch.dtype | Callable[[str], torch.dtype | None] | None
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

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], metadata: dict[str, str],
                 offsets: dict[str, tuple[int, int]] | None = None, data_start: int = 0):
        self.shapes, self.dtypes, self.metadata = shapes, dtypes, metadata
        self.offsets, self.data_start = offsets or {}, data_start     # byte range of each tensor in the file


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
    shapes, dtypes, offsets, end = {}, {}, {}, 0
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
        shapes[name], dtypes[name], offsets[name], end = shape, dtype, (start, stop), max(end, stop)
    if 8 + length + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt: the header describes {8 + length + end} bytes, "
                              f"the file has {size}")
    return TensorHeader(shapes, dtypes, metadata, offsets, 8 + length)


def load_safetensors(path: Path, dtype: DtypeChoice = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read one at a time with plain reads (no memory map), each
    floating-point one converted to ``dtype`` (when given: one dtype, or a function of the tensor's name) as it
    arrives.

    The peak is the result plus one tensor. A memory-mapped load (``safetensors.torch.load_file``) keeps the
    file's pages resident beside the tensors copied out of them until it returns, and converting afterwards
    holds both dtypes at once: for an fp16 SDXL folder loaded in float32 that was 19.3 GB against 13.9 GB of
    weights (docs/benchmarks.md)."""
    header = read_safetensors_header(path)
    out = {}
    with open(path, "rb", buffering=0) as f:
        for name, (start, stop) in sorted(header.offsets.items(), key=lambda item: item[1][0]):
            raw = torch.empty(stop - start, dtype=torch.uint8)
            view, done = memoryview(raw.numpy()), 0
            f.seek(header.data_start + start)
            while done < len(view):
                got = f.readinto(view[done:done + _READ_CHUNK])
                if not got:
                    raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
                done += got
            if header.dtypes[name] not in _TORCH_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {header.dtypes[name]}, "
                                      f"which torch cannot hold")
            tensor = raw.view(_TORCH_DTYPES[header.dtypes[name]]).reshape(header.shapes[name])
            out[name] = _cast(tensor, _dtype_for(dtype, name))
    return out


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


def _dtype_for(dtype: DtypeChoice, name: str) -> torch.dtype | None:
    """The dtype tensor ``name`` is wanted in under ``dtype`` (a dtype, a function of the name, or None: as stored)."""
    return dtype(name) if callable(dtype) else dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def cast_floating(tensors: dict[str, torch.Tensor], dtype: DtypeChoice) -> dict[str, torch.Tensor]:
    """The floating-point tensors in ``dtype`` (see ``_dtype_for``; all unchanged when it is None); integer ones
    as they are."""
    if dtype is None:
        return tensors
    return {k: _cast(v, _dtype_for(dtype, k)) for k, v in tensors.items()}


def load_tensors(path: Path, dtype: DtypeChoice = None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or pickle-format file, on the CPU; floating-point ones in ``dtype`` when
    given (one dtype, or a function of the tensor's name: an SD single file's VAE in float32 beside a bf16
    U-Net). A safetensors file already in the dtypes wanted is memory-mapped (a float32 SD 1.5 folder: 0.8 GB resident
    after loading, 3.8 s); one to convert is read and converted tensor by tensor (load_safetensors: loading
    that folder in bfloat16 peaked at 2.9 GB instead of 7.1)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        header = read_safetensors_header(path)
        stored = {k: _TORCH_DTYPES.get(v) for k, v in header.dtypes.items()}
        try:
            if dtype is None or all(d is None or not d.is_floating_point or _dtype_for(dtype, k) in (None, d)
                                    for k, d in stored.items()):
                # Nothing to convert: the library's memory map, whose pages are read only when first used.
                from safetensors.torch import load_file
                return load_file(str(path))
            return load_safetensors(path, dtype)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        return cast_floating(load_pickle(path), dtype)
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
