"""Atomic file writes: write a temporary file beside the target, then rename.

An interrupted run therefore leaves either the old file or the new one, never
a half-written file.
"""

from __future__ import annotations

import fcntl
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (creates parent folders): a temporary file renamed over ``path``.

    A reader never sees half a file. ``fsync=False`` skips flushing to disk before the rename (for files
    rewritten often inside a timed loop, where the rename's atomicity is all that matters; a crash of the
    machine may then leave an empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy the file ``source`` to ``target`` atomically (see :func:`atomic_write_bytes`; creates parent folders)."""
    return atomic_write_bytes(target, Path(source).read_bytes())


def copy_missing(source: str | os.PathLike, target: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Copy each file of ``source`` matching ``pattern`` (a glob, may hold subfolders) that ``target`` lacks.

    Atomic per file; a file already in ``target`` is never overwritten (it may be newer). Returns the copied
    paths relative to ``source``, sorted. A missing ``source`` copies nothing.
    """
    source, target = Path(source), Path(target)
    copied = []
    for path in sorted(source.glob(pattern)) if source.is_dir() else []:
        relative = path.relative_to(source)
        if path.is_file() and not (target / relative).exists():
            atomic_copy(path, target / relative)
            copied.append(str(relative))
    return copied


def check_writable(directory: str | os.PathLike, what: str = "output") -> Path:
    """Make sure files can be written into ``directory`` (created if missing) BEFORE long work starts.

    Probes by creating and deleting a temporary file there, so a read-only folder, a full disk's permission
    error or a path through a regular file fails now, not after the work. Returns the folder as a Path.
    Raises PermissionError naming the folder, what was to be written there (``what``) and the fix.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".posthoc-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"cannot write the {what} into {directory} ({type(err).__name__}: "
                              f"{err.strerror or err}); pass a writable folder") from err
    return directory


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the ``with`` block.

    A second holder, in this process or another on the same machine, waits until the first leaves its block (or
    dies: the operating system releases the lock with the process). For work that several processes may start
    at once, e.g. training one cached network: the one that waited then finds the result in the cache. POSIX only
    (``fcntl.flock``); the lock file is left in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
