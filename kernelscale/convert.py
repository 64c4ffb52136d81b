"""The per-file work of an ingest: load safely, validate, compute the file's statistics.

:func:`convert` is pure (it touches no store), so it can run on any worker process; the
single writer then commits its result (:meth:`kernelscale.store.Store.commit_file`) in
source order. ``convert_or_bad`` turns a bad file into a :class:`BadFile` record, so a
worker never raises across a process boundary for what is a property of the input.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .logfile import first_non_finite, load_log, sha256_file
from .sources.base import SourceFile
from .stats import LOG1P32, NonFiniteValues, RunningStats, stats_of_logits


@dataclass(frozen=True)
class ConvertSpec:
    """What every file of one ingest is converted with.

    ``expect``: the store's ``n_test``, ``n_train``, ``classes``, ``dtype`` (None before
    the store exists); ``transform``: the store's log-softmax
    (:data:`~kernelscale.stats.STORE_TRANSFORMS`); ``device``: where the statistics are
    computed (``cpu``, ``cuda``, ``cuda:N``; resolved by the caller).
    """

    expect: dict | None = None
    transform: str = LOG1P32
    device: str = "cpu"


@dataclass
class PreparedFile:
    """A validated file ready to commit: logits (runs, examples, classes) of the file's
    dtype, and its own statistics per split (float64 (examples, classes))."""

    file: SourceFile
    sha256: str
    test: np.ndarray
    train: np.ndarray
    stats: dict[str, RunningStats]
    seconds: float = 0.0  #: the conversion's wall time

    @property
    def runs(self) -> int:
        return int(self.test.shape[0])


@dataclass
class BadFile:
    file: SourceFile
    reason: str
    sha256: str | None = None


def convert(path: Path, file: SourceFile, spec: ConvertSpec | None = None) -> PreparedFile:
    """Load, validate and summarise the local copy ``path`` of ``file``.

    ``file.sha256``, when the source knows it, must match the bytes (hashed beside the
    load and the statistics). Non-finite logits
    are found from the statistics (a non-finite value makes its entry's sums
    non-finite), so the common, valid file costs no pass of its own for them. Raises
    :class:`BadInputError` naming the file and the problem.
    """
    t0 = time.perf_counter()
    spec = spec or ConvertSpec()
    # The hash runs beside the load and the statistics (hashlib and torch release the
    # GIL). A file whose bytes are not the listed ones is reported as that, whatever
    # else is wrong with it.
    problem: BadInputError | None = None
    st: dict[str, RunningStats] = {}
    log = None
    with ThreadPoolExecutor(1, thread_name_prefix="kernelscale-sha256") as pool:
        hashing = pool.submit(sha256_file, path)
        try:
            log = load_log(path, file.name, expect=spec.expect, check_finite=False)
            for split, key, a in (("test", "logits", log.test),
                                  ("train", "logits_train", log.train)):
                try:
                    st[split] = stats_of_logits(a, spec.transform, spec.device)
                except NonFiniteValues:
                    err = first_non_finite(log.name, key, a)
                    raise err or BadInputError(f"{log.name}: {key!r} overflows the "
                                               "log-softmax (logits too large for float32)"
                                               ) from None
        except BadInputError as e:
            problem = e
        try:
            digest = hashing.result()
        except OSError as e:
            raise BadInputError(f"{file.name}: cannot read ({e.strerror})") from None
    if file.sha256 is not None and digest != file.sha256:
        raise BadInputError(f"{file.name}: sha256 mismatch (expected {file.sha256}, got "
                            f"{digest}); the file is corrupt or was changed")
    if problem is not None:
        raise problem
    return PreparedFile(file, digest, log.test, log.train, st, time.perf_counter() - t0)


def convert_or_bad(path: Path, file: SourceFile,
                   spec: ConvertSpec | None = None) -> PreparedFile | BadFile:
    try:
        return convert(path, file, spec)
    except BadInputError as e:
        return BadFile(file, str(e))
