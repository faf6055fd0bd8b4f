"""Crash-safe files: every file ldm writes (PNGs, model weights and configs, manifests) goes through here.

A file appears under its final name only when it is complete and on disk: it is written to a temporary name
in the same folder, flushed and fsynced, given the mode an ordinary ``open()`` would have given it (0666 less
the umask: 0644 under umask 022; ``mkstemp`` alone leaves 0600), renamed over the final name, and the folder
is fsynced so that the rename survives a power cut. A killed writer leaves at most a ``.NAME.*.ldm-tmp`` file,
which :func:`remove_temporaries` clears. Imports nothing from ldm; any layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".ldm-tmp"  # only files with this suffix (and a leading dot) are ever cleaned up


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an error the file is
    fsynced, given the usual mode and renamed over ``path`` (then the folder is fsynced). On an error (a full
    disk: ENOSPC) the temporary file is removed and the error raised; ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``, even after a
    crash (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer left in ``folder``; returns how many."""
    count = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            count += 1
    return count


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove that a file can be written there; ValueError naming it if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ValueError(f"output folder {str(folder)!r} is a file") from None
    except OSError as e:
        raise ValueError(f"cannot write to output folder {str(folder)!r}: {e.strerror or e}") from None
    return folder
