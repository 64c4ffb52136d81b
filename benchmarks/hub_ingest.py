"""Hub ingest through the local test server (``tests/hubserver.py``): GB/s and the
download folder's high-water mark against its documented bound.

    python benchmarks/hub_ingest.py [--files 10] [--download-workers 4] [--converters 2]

Files are ``simulate``-shaped (500 runs of 1,000 test + 5,000 train examples, 10 classes,
~60 MB each), served from memory over HTTP on this machine, so the figure is the ingest's
own ceiling for a remote source, not a network's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                if not os.path.islink(p):
                    total += os.lstat(p).st_size
            except FileNotFoundError:
                continue
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--download-workers", type=int, default=4)
    ap.add_argument("--converters", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="ks-hub-bench-"))
    os.environ.update({"HF_HOME": str(work / "hf-home"), "HF_HUB_OFFLINE": "0",
                       "HF_HUB_DISABLE_XET": "1"})
    from kernelscale.bench import write_synthetic
    from kernelscale.ingestion import IngestConfig, ingest
    from kernelscale.sources import FetchOptions
    from tests.hubserver import HubServer

    src, store, cache = work / "src", work / "store", work / "cache"
    for p in (store, cache):
        shutil.rmtree(p, ignore_errors=True)
    files = write_synthetic(src, 500 * a.files, a.n_test, a.n_train, 10)
    size = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _folder_bytes(cache))

    with HubServer() as hub:
        hub.add_commit("local/sim", src)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        s = ingest(IngestConfig("hf://datasets/local/sim", store, converters=a.converters,
                                fetch=FetchOptions(download_workers=a.download_workers,
                                                   cache_dir=cache),
                                show_progress=False), endpoint=hub.url)
        dt = time.perf_counter() - t0
        done.set()
        sampler.join()
    bound = (a.download_workers + a.converters + 2) * largest
    print(s.line())
    print(f"hub bench: {len(files)} files, {size / 1e9:.3f} GB in {dt:.2f} s = "
          f"{size / dt / 1e9:.3f} GB/s with {a.download_workers} download workers and "
          f"{a.converters} converters; download folder high-water mark "
          f"{peak[0] / 1e6:.0f} MB = {peak[0] / largest:.2f} x the largest file (bound "
          f"(download workers + converters + 2) x = {bound / 1e6:.0f} MB); left after: "
          f"{_folder_bytes(cache)} B")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if peak[0] <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
