"""CPU-parallel ingest on dask.distributed: many files converted at once, one writer.

A *preparer* maps the fetched files of a source, in order, to ``(fetched, result)``
pairs. :func:`serial_preparer` converts in the calling process; :func:`dask_preparer`
runs the pure per-file work (:func:`~kernelscale.convert.convert_or_bad`: safe load, full
validation, the file's own float64 statistics) on dask workers, while the
caller still commits the results one file at a time in source order. The store written
is therefore the same as a serial ingest's, bit for bit.

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

from .convert import BadFile, PreparedFile, convert_or_bad
from .errors import ConfigError
from .sources.base import Fetched

Prepared = tuple[Fetched, PreparedFile | BadFile]
Preparer = Callable[[Iterator[Fetched], dict | None], Iterator[Prepared]]


def serial_preparer(fetched: Iterator[Fetched], expect: dict | None) -> Iterator[Prepared]:
    for f in fetched:
        yield f, convert_or_bad(f.path, f.file, expect)


def dask_preparer(client, window: int) -> Preparer:
    """A preparer that runs ``convert_or_bad`` on ``client``'s workers.

    At most ``window`` files are submitted ahead of the one the writer waits for; results
    are yielded in the order of ``files`` whatever order the workers finish in.
    """
    if window < 1:
        raise ConfigError(f"dask window must be >= 1, not {window}")

    def prepare(fetched: Iterator[Fetched], expect: dict | None) -> Iterator[Prepared]:
        todo = iter(fetched)
        inflight: deque = deque()

        def top_up() -> None:
            while len(inflight) < window:
                f = next(todo, None)
                if f is None:
                    return
                # pure=False: two files with equal arguments must still both be prepared
                inflight.append((f, client.submit(convert_or_bad, f.path, f.file, expect,
                                                  pure=False)))

        try:
            top_up()
            while inflight:
                f, fut = inflight.popleft()
                result = fut.result()
                fut.release()  # the worker may drop its copy now
                top_up()
                yield f, result
        finally:
            # the writer stopped early (bad file, --max-runs): drop work nobody will use
            for _, fut in inflight:
                fut.cancel()

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
                      window: int | None = None) -> Iterator[Preparer]:
    """The preparer for ``--workers``/``--scheduler``; serial for 1 worker.

    ``window`` defaults to the workers' thread count plus two, so every worker has a file
    queued while the writer commits.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, not {workers}")
    if not scheduler and (workers is None or workers == 1):
        yield serial_preparer
        return
    with dask_client(workers, scheduler) as client:
        threads = sum(client.nthreads().values()) or 1
        yield dask_preparer(client, window or threads + 2)
