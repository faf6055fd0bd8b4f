"""Device and dtype names from users ("cuda:1", "fp16", ...) checked and turned into torch objects.

Library code never picks a device itself: ``None`` means the CPU, and anything else must be asked for. The one
choice made for the user, and only when asked with ``dtype="auto"``, is the fastest dtype the device runs well.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch.device; ValueError for a malformed name or a backend this machine lacks."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} asked for, but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


# CPU flags (Linux /proc/cpuinfo names) of native bf16 arithmetic: Intel AMX tiles (Sapphire Rapids and later)
# and AVX-512 BF16 dot products (Cooper Lake, AMD Zen 4 and later). Without them torch emulates bf16 by
# converting to float32 and back, which is slower than float32 itself.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``flags`` in /proc/cpuinfo); empty where there is none."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 products natively (``NATIVE_BF16_FLAGS``; ``flags`` default:
    ``cpu_flags()``)."""
    return any(f in (cpu_flags() if flags is None else flags) for f in NATIVE_BF16_FLAGS)


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The fast dtype for ``device`` (None: the CPU): float16 on CUDA (tensor cores; the VAE decode upcasts),
    bfloat16 on CPUs with native bf16 (float32's exponent range, so no overflow to fear, at half the bytes),
    float32 elsewhere (MPS included: its bf16 support depends on the OS version)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda":
        return torch.float16
    if dev.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """float32 / float16 / bfloat16 from a torch dtype or a name (fp32, fp16, bf16, ...); None -> float32;
    "auto" -> ``auto_dtype(device)``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def resolve_vae_dtype(vae_dtype: str | torch.dtype | None, dtype: str | torch.dtype | None = None,
                      device: str | torch.device | None = None) -> torch.dtype:
    """The VAE's dtype: ``vae_dtype`` when given; None -> bfloat16 when ``dtype`` is "auto" and gives bfloat16
    (the fast setting is fast end to end: a bf16 decode keeps float32's exponent range, so nothing overflows,
    and moves the images by a mean 0.7-0.8/255, docs/benchmarks.md), float32 otherwise (SD's VAEs overflow in
    float16, so "auto" on CUDA still decodes in float32)."""
    if vae_dtype is not None:
        return resolve_dtype(vae_dtype, device)
    auto = isinstance(dtype, str) and dtype.lower() == "auto"
    return torch.bfloat16 if auto and resolve_dtype(dtype, device) == torch.bfloat16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
