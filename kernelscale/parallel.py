"""Parallel conversion for ingest: many files converted at once, one writer.

A *preparer* maps the fetched files of a source, in order, to ``(fetched, result)``
pairs. :func:`serial_preparer` converts in the calling thread (a reference for tests);
:func:`thread_preparer` on threads of this process (the load, hash and statistics
release the GIL), for every source, while downloads run ahead and the writer commits;
:func:`dask_preparer` runs the pure per-file work
(:func:`~kernelscale.convert.convert_or_bad`: safe load, full validation, the file's own
statistics) on dask workers. The caller commits the results
one file at a time in source order, so the store written is the same as a serial
ingest's, bit for bit.

Memory: at most ``window`` prepared files exist at once (on the workers or in transit),
each holding its logits (``runs * (n_test + n_train) * classes`` of the file's dtype)
plus its statistics (``2 * (n_test + n_train) * classes`` float64).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from .convert import BadFile, ConvertSpec, PreparedFile, convert_or_bad
from .errors import ConfigError
from .sources.base import Fetched

Prepared = tuple[Fetched, PreparedFile | BadFile]
Preparer = Callable[[Iterator[Fetched], ConvertSpec], Iterator[Prepared]]


def serial_preparer(fetched: Iterator[Fetched], spec: ConvertSpec) -> Iterator[Prepared]:
    for f in fetched:
        yield f, convert_or_bad(f.path, f.file, spec)


def _in_order(submit, fetched: Iterator[Fetched], window: int) -> Iterator[Prepared]:
    """Keep ``window`` files submitted ahead; yield results in the order of ``fetched``.

    An error getting a file (a download that gave up) is raised where that file would
    have been yielded, so the files before it are still committed.
    """
    todo = iter(fetched)
    inflight: deque = deque()
    error: list[Exception] = []

    def top_up() -> None:
        while not error and len(inflight) < window:
            try:
                f = next(todo, None)
            except Exception as e:  # noqa: BLE001 -- re-raised in order below
                error.append(e)
                return
            if f is None:
                return
            inflight.append((f, submit(f)))

    try:
        top_up()
        while inflight:
            f, fut = inflight.popleft()
            result = fut.result()
            release = getattr(fut, "release", None)
            if release is not None:
                release()  # a dask worker may drop its copy now
            top_up()
            yield f, result
        if error:
            raise error[0]
    finally:
        # the writer stopped early (bad file, --max-runs): drop work nobody will use
        for _, fut in inflight:
            fut.cancel()


def thread_preparer(threads: int, window: int | None = None) -> Preparer:
    """A preparer converting on ``threads`` threads of this process, at most ``window``
    files (default ``threads + 1``) ahead of the one the writer waits for."""
    if threads < 1:
        raise ConfigError(f"--converters must be >= 1, not {threads}")

    def prepare(fetched: Iterator[Fetched], spec: ConvertSpec) -> Iterator[Prepared]:
        with ThreadPoolExecutor(threads, thread_name_prefix="kernelscale-convert") as pool:
            yield from _in_order(
                lambda f: pool.submit(convert_or_bad, f.path, f.file, spec), fetched,
                window or threads + 1)

    return prepare


def dask_preparer(client, window: int) -> Preparer:
    """A preparer that runs ``convert_or_bad`` on ``client``'s workers.

    At most ``window`` files are submitted ahead of the one the writer waits for; results
    are yielded in the order of ``files`` whatever order the workers finish in.
    """
    if window < 1:
        raise ConfigError(f"dask window must be >= 1, not {window}")

    def prepare(fetched: Iterator[Fetched], spec: ConvertSpec) -> Iterator[Prepared]:
        # pure=False: two files with equal arguments must still both be prepared
        yield from _in_order(
            lambda f: client.submit(convert_or_bad, f.path, f.file, spec, pure=False),
            fetched, window)

    return prepare


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None) -> Iterator:
    """A dask Client: of ``scheduler`` when given, else of a private LocalCluster.

    The LocalCluster runs ``workers`` processes with one thread each (the per-file work
    holds the GIL in parts, and processes keep one file's failure from taking the others
    down). Dask's own memory limit is off: on a cluster the batch system enforces the
    job's memory, and dask's per-worker share of the whole node would be wrong there.
    """
    # dask logs every worker start and stop at INFO; the worker processes read the
    # environment, this process its loggers
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, memory_limit=0,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def parallel_preparer(workers: int | None, scheduler: str | None = None,
                      window: int | None = None, converters: int = 1) -> Iterator[Preparer]:
    """The preparer for ``--workers``/``--scheduler`` (dask processes), else for
    ``--converters`` (threads: even one converter thread lets the next file be
    converted while the writer commits this one, mostly waiting on the disk).

    ``window`` defaults to the workers' thread count plus two, so every worker has a file
    queued while the writer commits.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, not {workers}")
    if not scheduler and (workers is None or workers == 1):
        yield thread_preparer(converters, window)
        return
    with dask_client(workers, scheduler) as client:
        threads = sum(client.nthreads().values()) or 1
        yield dask_preparer(client, window or threads + 2)
