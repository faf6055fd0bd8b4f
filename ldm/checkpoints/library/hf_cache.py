"""Hugging Face repo ids ("stabilityai/stable-diffusion-xl-base-1.0") -> the model's folder in the local Hugging
Face cache, offline.

The lookup is ``huggingface_hub``'s own (``snapshot_download(..., local_files_only=True)``): its cache layout
(``models--ORG--NAME/refs/main``, ``snapshots/REV/``, ``blobs/``), its rules for ``revision`` (a branch or tag
read from ``refs/``, or a commit hash), and its cache location (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Nothing here opens a network connection: a model that is not in the cache is one
``ModelNotCached`` error naming the folder looked in and the command that downloads it.
"""
from __future__ import annotations

import re
from pathlib import Path

from ldm.checkpoints.tensor_io import CheckpointError

# huggingface_hub's own repo-id rule (utils/_validators.py, validate_repo_id) narrowed to "namespace/name": ldm
# takes only such ids, so a plain word stays a file name or a library name.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


class ModelNotCached(CheckpointError):
    """A repo id that the local Hugging Face cache does not hold (at the asked revision)."""


def is_repo_id(text: str) -> bool:
    """``namespace/name`` as the Hub spells repo ids (no ``..``, no leading ``/``, no ``~``, no backslash)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def cache_folder(repo_id: str, cache_dir=None) -> Path:
    """Where huggingface_hub keeps ``repo_id``'s files: ``CACHE/models--ORG--NAME``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir=None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: the ``main`` branch) in the local cache."""
    if not is_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hugging Face repo id (expected ORG/NAME)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    where = cache_folder(repo_id, cache_dir)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError as exc:
        raise CheckpointError(f"{repo_id!r}: {exc}") from None
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        get = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ModelNotCached(
            f"{repo_id}{at} is not in the local Hugging Face cache (looked in {where}); ldm never downloads: "
            f"on a machine with internet run `{get}` (HF_HUB_CACHE / HF_HOME choose the cache), or pass a "
            "path to the model") from None
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: the cached snapshot of {repo_id} has no model_index.json (not a "
                              "diffusers pipeline, or only part of it was downloaded)")
    return folder
