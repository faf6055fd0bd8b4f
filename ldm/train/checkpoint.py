"""Training checkpoints: written atomically, read back exactly.

Layout: ``OUTPUT/checkpoints/step-00001234/`` holding

* ``<name>.safetensors`` for each tensor group (networks, EMA shadows, LoRA adapters);
* ``<name>.pt`` for optimiser and LR-scheduler state (tensors, numbers and lists only, read with
  ``torch.load(weights_only=True)``, so a checkpoint can never run code);
* ``rng-<rank>.json`` + ``rng-<rank>.safetensors``: Python, NumPy and torch (CPU and CUDA) generator states of
  every process;
* ``state.json``: step, config and anything else the trainer records, written last.

Everything is written into ``.tmp-step-00001234`` and renamed into place once whole (a rename is atomic), so a
run killed at any moment leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE = "state.json"


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:08d}"


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder only gets its final name once complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(folder: str | Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: str | Path) -> None:
    """Delete temporary folders left by a run killed while writing a checkpoint."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# random number generator states


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able part, tensor part) of every global generator of this process."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------------
# save / load


def save(folder: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, dict],
         state: dict, rank: int = 0, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` (called by every process; only the main one writes the shared parts)."""
    folder = Path(folder)
    final = step_dir(folder, step)
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    meta, rng = rng_state()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(meta), encoding="utf-8")
    save_file(rng, str(tmp / f"rng-{rank}.safetensors"))
    barrier()
    if is_main:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        for name, obj in objects.items():
            torch.save(obj, tmp / f"{name}.pt")
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: str | Path, rank: int = 0) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """(state, tensor groups, objects) of a checkpoint, and this process's RNG states restored."""
    path = Path(path)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if not p.name.startswith("rng-")}
    objects = {p.stem: torch.load(p, weights_only=True) for p in path.glob("*.pt")}
    rng_json = path / f"rng-{rank}.json"
    if not rng_json.is_file():
        raise ValueError(f"checkpoint {path} has no RNG state for process {rank}: it was written by a run with "
                         f"fewer processes; resume with the same number of processes")
    set_rng_state(json.loads(rng_json.read_text(encoding="utf-8")), load_file(str(path / f"rng-{rank}.safetensors")))
    return state, tensors, objects
