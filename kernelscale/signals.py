"""Stop signals of long stages: SIGTERM and SIGUSR1 (Slurm's time-limit warning), Ctrl-C.

A stage checks a :class:`StopFlag` at safe points (a kernel at run-chunk boundaries),
saves its state and raises :class:`~kernelscale.errors.Interrupted`; the command line
exits with status 75 so a batch wrapper requeues it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's time-limit warning); checked at chunk boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []


def catch_signals_early() -> None:
    """Record stop signals that arrive before a computation installs its own handlers.

    Called first thing by the command line, so Slurm's time-limit warning during imports
    or statistics is not fatal: the next :func:`stop_on_signals` sees it as already set.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _early.append(signum))


@contextlib.contextmanager
def stop_on_signals(sigs: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopFlag]:
    flag = StopFlag()
    if _early:
        flag.signum = _early[-1]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.signum = signum

    def interrupt(signum, frame):
        # Ctrl-C saves a checkpoint like SIGTERM; a second Ctrl-C stops at once.
        if flag.signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        print("kernel: interrupted; saving a checkpoint at the next run-chunk (Ctrl-C again "
              "to stop without it)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in sigs}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
