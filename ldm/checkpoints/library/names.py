"""Names or paths: what ``Pipeline.from_pretrained``, ``load_vae``, ``load_control``, ``<lora:NAME:W>`` and the
commands accept where a model file is asked for. A path that exists is always taken as the path; otherwise the
name is looked up in the models folder's library (``index``), and a model also in the Hugging Face cache.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ldm.checkpoints.library.hf_cache import cached_snapshot, is_repo_id
from ldm.checkpoints.library.index import ENV, Library, LibraryError

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


def resolve_file(kind: str, name, library: Library | None) -> Path:
    """``name`` as a path where one exists (or without a library), else the library's entry of ``kind``."""
    path = Path(name).expanduser()
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
    where = f"a name from the models folder {library.root}" if library else "a library name (--models-dir / " \
        f"${ENV})"
    raise LibraryError(f"model {text!r} does not exist (pass an SD .safetensors/.ckpt file, a diffusers/ldm model "
                       f"folder, a Hugging Face repo id ORG/NAME from the local cache, or {where})")
