"""Names or paths: what ``Pipeline.from_pretrained``, ``load_vae``, ``load_control``, ``<lora:NAME:W>`` and the
commands accept where a model file is asked for. A path that exists is always taken as the path; otherwise the
name is one ldm ships (``default-canny``: the default model's canny ControlNet) or is looked up in the models
folder's library (``index``), and a model also in the Hugging Face cache.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ldm.checkpoints.library.hf_cache import cached_snapshot, is_repo_id
from ldm.checkpoints.library.index import ENV, Library, LibraryError

# (kind, name) -> the ldm.assets attribute holding the file ldm ships under that name
BUILT_IN = {("controlnet", "default-canny"): "DEFAULT_CANNY"}
_OPEN: dict[Path, Library] = {}
_OPEN_LOCK = threading.Lock()


def open_library(models_dir=None) -> Library | None:
    """The library of ``models_dir`` (None: ``$LDM_MODELS_DIR``; neither: None), one shared index per folder."""
    if isinstance(models_dir, Library):
        return models_dir
    models_dir = models_dir or os.environ.get(ENV) or None
    if models_dir is None:
        return None
    root = Path(models_dir).expanduser().absolute()
    with _OPEN_LOCK:
        if root not in _OPEN:
            _OPEN[root] = Library(root)
        return _OPEN[root]


def built_in(kind: str, name) -> Path | None:
    """The file ldm ships under ``name`` for ``kind`` (BUILT_IN), or None."""
    from ldm import assets

    attribute = BUILT_IN.get((kind, str(name)))
    return getattr(assets, attribute) if attribute else None


def resolve_file(kind: str, name, library: Library | None) -> Path:
    """``name`` as a path where one exists, else a name ldm ships (``built_in``), else (with a library) the library's
    entry of ``kind``."""
    path = Path(name).expanduser()
    shipped = None if path.exists() else built_in(kind, name)
    if shipped is not None:
        return shipped
    if path.exists() or library is None:
        return path
    return library.find(kind, str(name)).path


def resolve_model(name, library: Library | None = None, *, revision: str | None = None, cache_dir=None) -> Path:
    """A model as ``Pipeline.from_pretrained`` takes it: a path that exists, a library checkpoint, or a Hugging Face
    repo id found in the local cache (``ldm.checkpoints.hf_cache``; ``revision`` applies to those only)."""
    text = str(name)
    path = Path(text).expanduser()
    entry = None if path.exists() or library is None else library.lookup("checkpoint", text)
    if path.exists() or entry is not None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face repo ids, not to {text!r}")
        return path if entry is None else entry.path
    if is_repo_id(text):
        return cached_snapshot(text, revision, cache_dir)
    others = "an SD .safetensors/.ckpt file, a diffusers/ldm model folder, a Hugging Face repo id ORG/NAME from " \
             "the local cache"
    if library is None:
        raise LibraryError(f"model {text!r} does not exist (pass {others}, or a library name with --models-dir / "
                           f"${ENV})")
    try:
        return library.find("checkpoint", text).path        # (lookup found none: find's error names the nearest)
    except LibraryError as e:
        raise LibraryError(f"model {text!r} does not exist: {e} (or pass {others})") from None
