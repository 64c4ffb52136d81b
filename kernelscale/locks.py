"""Advisory locks of a kernel folder (``flock``): who may write which region, and who
holds it.

``KERNEL/.lock`` is shared by every writer and taken exclusively by a removal
(``--restart``/``--overwrite``); ``KERNEL/.locks/<region>.lock`` is exclusive per region
being computed and holds a note naming its holder while it is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import KernelOutputError
from .plan import Tile


def lock_holders(path: Path, lock: Path | None = None) -> str:
    """Who holds the region lock ``lock``, or every region lock of the kernel at
    ``path`` (a holder's note is cleared when it lets go)."""
    if lock is not None:
        files = [lock]
    else:
        files = (sorted((path / ".locks").glob("*.lock")) if (path / ".locks").is_dir()
                 else [])
    notes = []
    for f in files:
        with contextlib.suppress(OSError):
            text = f.read_text().strip()
            if text:
                notes.append(text)
    return "; ".join(notes) or "another process"


@contextlib.contextmanager
def flock_or_refuse(path: Path, mode: int, refusal: str):
    """Hold ``flock(mode)`` on ``path`` (created) for the block; ``refusal`` is the
    error when another process holds a conflicting lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 -- held for the whole block
    try:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KernelOutputError(refusal) from None
        yield fh
    finally:
        fh.close()


@contextlib.contextmanager
def writer_lock(path: Path, region: Tile):
    """Held while a process computes ``region`` of the kernel at ``path``: a shared lock
    on the kernel (many Slurm tasks write disjoint regions at once) and an exclusive one
    on the region, so a second writer of the same region, or a ``--restart`` or
    ``--overwrite`` of the kernel, is refused with one line naming the holder."""
    with flock_or_refuse(path / ".lock", fcntl.LOCK_SH,
                f"{path}: being removed or replaced by another process (--restart or "
                "--overwrite)"):
        lock = path / ".locks" / f"{region.key}.lock"
        with flock_or_refuse(lock, fcntl.LOCK_EX,
                    f"{path}: rows {region.r0}:{region.r1}, cols {region.c0}:{region.c1} are "
                    f"being computed by {lock_holders(path, lock)}") as fh:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()  # the note names a live holder only
