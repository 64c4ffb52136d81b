"""Atomic file writes: temp file in the same directory, fsync, ``os.replace``, fsync dir.

A reader (or a process restarted after ``kill -9``) sees either the old file or the new
one, never a torn write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once at import: os.umask() can only be read by setting it, which would race with
#: files created meanwhile by other threads
_UMASK = _umask()


def dir_umask() -> int:
    """The process's umask (read once at import)."""
    return _UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", durable: bool = True
                ) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on clean exit make it ``path`` atomically.
    ``durable=False`` leaves out the fsyncs of the file and its folder (the caller's, see
    :func:`fsync_files`): still atomic under ``kill -9``, not yet against a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes 0600 files; a store or kernel on a shared file system must stay
    # readable by the group as a plain open() would have made it.
    os.fchmod(fd, 0o666 & ~_UMASK)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write: name the file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


#: How old the temp file (or folder) of a write must be before another run removes it
#: as abandoned: a live write renames its temp within seconds, so one this old is what a
#: killed process left behind, while a younger one may be a concurrent writer's.
STALE_TEMP_SECONDS = 600.0


def remove_stale_temps(path: str | os.PathLike,
                       max_age: float = STALE_TEMP_SECONDS) -> None:
    """Remove the temps that killed writes of ``path`` left beside it (``.NAME.*.tmp``,
    files of :func:`atomic_open`, folders of other writers), when older than ``max_age``
    seconds. Only names of that pattern are touched; a symbolic link is never followed."""
    import glob
    import shutil
    import time

    path = Path(path)
    now = time.time()
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            if now - st.st_mtime <= max_age:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()


def fsync_files(paths: list[Path]) -> None:
    """Make files written with ``atomic_open(..., durable=False)`` durable: each file, then
    each of their folders once. Written first and synced together, they share the file
    system's journal commits instead of paying one or two each."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({Path(p).parent for p in paths}):
        fsync_dir(d)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, "wb", durable) as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    atomic_write_bytes(path, data + b"\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as fh:
        return json.load(fh)


def check_output_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path, refusing one that exists and is not a directory (a file, or a
    link to one) with :class:`~kernelscale.errors.BadInputError` naming it."""
    from .errors import BadInputError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BadInputError(f"{p}: exists and is not a directory; choose another {what}")
    if not p.exists() and p.is_symlink():
        raise BadInputError(f"{p}: is a broken symbolic link; choose another {what}")
    return p
