"""The files of a batch run that must survive a kill at any moment: atomic writes, the manifest, the plan record.

* ``ldm.files.write_atomic`` puts bytes under their final name only when they are complete and on disk
  (temporary file in the same folder, fsync, rename, fsync of the folder).
* ``manifest.jsonl`` holds one JSON line per finished image. A process appends a record only after the image's
  rename is durable, with one ``write`` + fsync, so a record never names a missing or partial file. A kill can
  at worst leave a torn last line, which :func:`read_records` skips (the image is then made again).
  Several processes never append to one file: each rank appends to ``manifest.rank{R}.jsonl`` and
  :func:`merge` folds the parts into ``manifest.jsonl`` (de-duplicated, sorted, written atomically).
* ``batch.json`` records what the folder is being filled from (settings, one hash per prompt-file line), so a
  rerun with a changed file or changed settings is refused with a message that says what changed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from ldm.files import write_atomic

MANIFEST = "manifest.jsonl"
PLAN = "batch.json"
PLAN_VERSION = 1


class ManifestWriter:
    """Appends one JSON line per call with a single ``write`` on an O_APPEND descriptor, then fsyncs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk can cut a write short; the torn line is skipped when read
            raise OSError(28, f"short write to {self.path} ({written} of {len(data)} bytes)")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a manifest file (a missing file has none; a torn or corrupt line is skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line (killed mid-write) or an empty line
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def part_path(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"manifest.rank{rank}.jsonl"


def merge(folder: str | os.PathLike, key: Callable[[dict], Hashable]) -> list[dict[str, Any]]:
    """Fold ``manifest.jsonl`` and every rank's part into one ``manifest.jsonl``: one record per ``key`` (the
    latest wins: parts are newer than the merged file), sorted by key, written atomically; then the parts go."""
    folder = Path(folder)
    parts = sorted(folder.glob("manifest.rank*.jsonl"))
    merged: dict[Hashable, dict[str, Any]] = {}
    for source in [folder / MANIFEST, *parts]:
        for record in read_records(source):
            with contextlib.suppress(KeyError, TypeError):
                merged[key(record)] = record
    records = [merged[k] for k in sorted(merged)]
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    if parts or (folder / MANIFEST).exists():
        write_atomic(folder / MANIFEST, text.encode("utf-8"))
    for p in parts:
        p.unlink()
    return records


# ---------------------------------------------------------------------- batch.json: what the folder is made from
def load_plan(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / PLAN
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); pass --overwrite to start the batch over") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{path} was written by another version of ldm; pass --overwrite to start over")
    return plan


def save_plan(folder: str | os.PathLike, plan: dict[str, Any]) -> None:
    write_atomic(Path(folder) / PLAN, json.dumps({**plan, "version": PLAN_VERSION}, ensure_ascii=False,
                                                 indent=1, sort_keys=True).encode("utf-8"))


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two plans, in words: settings first, then prompt-file lines."""
    reasons = [f"{k}: {old['settings'].get(k)!r} -> {new['settings'].get(k)!r}"
               for k in sorted(set(old.get("settings", {})) | set(new["settings"]))
               if old.get("settings", {}).get(k) != new["settings"].get(k)]
    old_lines, new_lines = old.get("lines", {}), new["lines"]
    for what, numbers in (("changed", [k for k in new_lines if k in old_lines and old_lines[k] != new_lines[k]]),
                          ("added", [k for k in new_lines if k not in old_lines]),
                          ("removed", [k for k in old_lines if k not in new_lines])):
        if numbers:
            reasons.append(f"{what} line{'s' if len(numbers) > 1 else ''} {_some(sorted(numbers, key=int))}")
    return "; ".join(reasons) or "the plan differs"


def _some(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
