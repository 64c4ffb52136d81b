"""The per-file work of an ingest: load safely, validate, compute the file's statistics.

:func:`convert` is pure (it touches no store), so it can run on any worker process; the
single writer then commits its result (:meth:`kernelscale.store.Store.commit_file`) in
source order. ``convert_or_bad`` turns a bad file into a :class:`BadFile` record, so a
worker never raises across a process boundary for what is a property of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .logfile import load_log
from .sources.base import SourceFile
from .stats import RunningStats, stats_of_logits


@dataclass
class PreparedFile:
    """A validated file ready to commit: logits (runs, examples, classes) of the file's
    dtype, and its own statistics per split (float64 (examples, classes))."""

    file: SourceFile
    sha256: str
    test: np.ndarray
    train: np.ndarray
    stats: dict[str, RunningStats]

    @property
    def runs(self) -> int:
        return int(self.test.shape[0])


@dataclass
class BadFile:
    file: SourceFile
    reason: str
    sha256: str | None = None


def convert(path: Path, file: SourceFile, expect: dict | None = None) -> PreparedFile:
    """Load, validate and summarise the local copy ``path`` of ``file``.

    ``expect``: the store's ``n_test``, ``n_train``, ``classes``, ``dtype`` (optional);
    ``file.sha256``, when the source knows it, must match the bytes. Raises
    :class:`BadInputError` naming the file and the problem.
    """
    log = load_log(path, file.name, expect=expect, sha256=file.sha256)
    st = {"test": stats_of_logits(log.test), "train": stats_of_logits(log.train)}
    return PreparedFile(file, log.sha256, log.test, log.train, st)


def convert_or_bad(path: Path, file: SourceFile,
                   expect: dict | None = None) -> PreparedFile | BadFile:
    try:
        return convert(path, file, expect)
    except BadInputError as e:
        return BadFile(file, str(e))
