"""``kernelscale bench --ingest``: ingest and files -> kernel against their floors.

Measured in one invocation, on the same ``log.pt`` files (``simulate``-shaped, 500 runs
per file) and machine:

* **floors**: reading the files' bytes cold (page cache dropped) and warm,
  ``torch.load`` of every file alone (a subprocess, files cached; a plain ``log.pt`` is
  mapped without it, from the same cached pages), the statistics of
  one file computed from memory (times the number of files): the compute any ingest pays;
  writing the same bytes durably (one file per input file, each fsynced): what any
  ingest that keeps its store after a crash pays; and the kernel's matrix products
  (``classes`` products of (n_test, runs) by (runs, n_train) float32, one timed and
  multiplied), which the kernel and the published method both pay;
* **ingest**: ``kernelscale ingest`` with 1 and 2 converters (a subprocess each, files
  dropped from the page cache first): GB/s, and the ratio to the ``torch.load`` floor;
* **files -> kernel**: ``ingest`` then ``kernel`` (two processes, wall time and peak RSS
  of each) against the published method on the same files (one process), and the floor
  of the two stages: the durable write plus the matrix products plus the two processes'
  start-ups (Python with torch, Zarr and kernelscale imported; an ingest on the CPU
  without torch; the published method's one start-up is in its own time).

Results are printed and written to ``OUT/bench-ingest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .bench import (
    BASELINE,
    REFERENCE,
    _claim,
    _machine,
    drop_cache,
    run_measured,
    write_synthetic,
)

#: what an ingest process on the CPU imports (no torch), then exits as the program does
INGEST_BASELINE = ("import numpy, zarr, kernelscale.ingestion, kernelscale.store; "
                   "import gc; gc.freeze()")

#: ``torch.load`` of every file, timed in the child: the loading floor the issue names
LOAD_ALONE = r'''
import json, sys, time
import torch
files = json.loads(sys.argv[1])
t0 = time.perf_counter()
for f in files:
    obj = torch.load(f, map_location="cpu", weights_only=True)
    del obj
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''


def _read_all(files: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def _stats_floor(path: Path, device: str) -> float:
    """Seconds of one file's statistics (both splits) computed from memory, best of 3:
    the compute every ingest of that file pays, whatever its I/O."""
    import torch

    from .device import resolve_device
    from .stats import stats_of_logits

    obj = torch.load(path, map_location="cpu", weights_only=True)
    dev = resolve_device(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for key in ("logits", "logits_train"):
            stats_of_logits(obj[key], device=dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _write_floor(folder: Path, sizes: list[int]) -> float:
    """Seconds to write ``sizes`` bytes as one file each, each fsynced before the next
    (as the store commits a file's chunks), from one reused buffer; the files are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = memoryview(bytearray(8 << 20))
    t0 = time.perf_counter()
    for i, size in enumerate(sizes):
        with open(folder / f"w{i:05d}", "wb", buffering=0) as fh:
            left = size
            while left > 0:
                left -= fh.write(buf[:min(left, len(buf))])
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder)
    return seconds


def _matmul_floor(n_test: int, n_train: int, runs: int, classes: int, device: str) -> float:
    """Seconds of the kernel's ``classes`` float32 products (n_test, runs) @ (runs, n_train)
    by the engine's GEMM (numpy's BLAS on the CPU, torch's on a GPU): one product timed
    (best of 2, after a warm-up on the device) times ``classes``."""
    import torch

    from .device import resolve_device

    dev = resolve_device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(runs, n_test, generator=g).to(dev)
    b = torch.randn(runs, n_train, generator=g).to(dev)
    prod = np.empty((n_test, n_train), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        if dev.type == "cpu":
            np.matmul(a.numpy().T, b.numpy(), out=prod)
        else:
            a.T @ b
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return best * classes


def run_ingest_bench(out: Path, *, n_test: int, n_train: int, runs: int, classes: int,
                     device: str, skip_reference: bool, keep: bool) -> dict:
    """Write the files, measure every figure above, print and save them."""
    py = sys.executable
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    _claim(out)
    src = out / "src"
    t0 = time.perf_counter()
    files = write_synthetic(src, runs, n_test, n_train, classes)
    nbytes = sum(f.stat().st_size for f in files)
    gb = nbytes / 1e9
    print(f"bench: {len(files)} file(s), {runs} runs, test {n_test}, train {n_train}, "
          f"classes {classes}, {gb:.3f} GB ({time.perf_counter() - t0:.1f} s to write)",
          flush=True)
    r: dict = {"machine": _machine(device), "shape": [n_test, n_train, classes],
               "runs": runs, "files": len(files), "bytes": nbytes, "device": device}
    # the baseline process (Python with torch, Zarr and kernelscale imported): its peak
    # RSS is subtracted from every stage's; its wall time, best of two, is the start-up
    # every stage's process pays
    baseline = [run_measured([py, "-c", BASELINE], env) for _ in range(2)]
    base = baseline[0].peak_rss
    r["baseline_rss"] = base
    r["startup_s"] = min(b.seconds for b in baseline)
    # an ingest on the CPU imports no torch: its own start-up, best of two
    r["ingest_startup_s"] = r["startup_s"] if device != "cpu" else min(
        run_measured([py, "-c", INGEST_BASELINE], env).seconds for _ in range(2))

    drop_cache([src])
    r["read_cold_s"] = _read_all(files)
    r["read_warm_s"] = _read_all(files)
    load = run_measured([py, "-c", LOAD_ALONE, json.dumps([str(f) for f in files])], env)
    r["torch_load_s"] = json.loads(load.stdout.strip().splitlines()[-1])["seconds"]
    r["stats_s"] = _stats_floor(files[0], device) * len(files)
    r["write_s"] = _write_floor(out / "write-floor", [f.stat().st_size for f in files])
    r["matmul_s"] = _matmul_floor(n_test, n_train, runs, classes, device)
    print(f"bench: floors: read cold {gb / r['read_cold_s']:.2f} GB/s, warm "
          f"{gb / r['read_warm_s']:.2f} GB/s; torch.load alone {gb / r['torch_load_s']:.3f} "
          f"GB/s ({r['torch_load_s']:.2f} s); statistics alone (one file in memory, all "
          f"cores) {gb / r['stats_s']:.3f} GB/s", flush=True)
    print(f"bench: floors: durable write (fsync per file) {gb / r['write_s']:.3f} GB/s "
          f"({r['write_s']:.2f} s); kernel products ({classes} x ({n_test}, {runs}) @ "
          f"({runs}, {n_train}) float32 on {device}) {r['matmul_s']:.2f} s; process "
          f"start-up {r['startup_s']:.2f} s (ingest's {r['ingest_startup_s']:.2f} s)",
          flush=True)

    def ingest(store: Path, converters: int) -> dict:
        shutil.rmtree(store, ignore_errors=True)
        drop_cache([src])
        m = run_measured([py, "-m", "kernelscale", "-q", "ingest", str(src), "--store",
                          str(store), "--converters", str(converters), "--device", device],
                         env)
        return {"seconds": m.seconds, "gb_s": gb / m.seconds,
                "peak_rss_above_baseline": m.peak_rss - base,
                "summary": (m.stdout + m.stderr).strip().splitlines()[-1]}

    r["ingest"] = {}
    for n in (1, 2):
        d = ingest(out / "store", n)
        r["ingest"][n] = d
        print(f"bench: ingest, {n} converter(s): {d['seconds']:.2f} s = {d['gb_s']:.3f} GB/s "
              f"(whole process) = {r['torch_load_s'] / d['seconds']:.2f} x the torch.load "
              f"floor, {r['stats_s'] / d['seconds']:.2f} x the statistics floor; peak RSS "
              f"above baseline "
              f"{d['peak_rss_above_baseline'] / 1e9:.3f} GB", flush=True)
        print(f"bench:   {d['summary']}", flush=True)

    kout = out / "kernel"
    shutil.rmtree(kout, ignore_errors=True)
    drop_cache([out / "store"])
    k = run_measured([py, "-m", "kernelscale", "-q", "kernel", "--store", str(out / "store"),
                      "--out", str(kout), "--device", device], env)
    # files -> kernel with the faster of the two ingests (both built the same store)
    n_best = min(r["ingest"], key=lambda n: r["ingest"][n]["seconds"])
    ing = r["ingest"][n_best]
    r["kernel"] = {"seconds": k.seconds, "peak_rss_above_baseline": k.peak_rss - base,
                   "summary": (k.stdout + k.stderr).strip().splitlines()[-1]}
    total = ing["seconds"] + k.seconds
    peak = max(ing["peak_rss_above_baseline"], k.peak_rss - base)
    r["files_to_kernel"] = {"seconds": total, "peak_rss_above_baseline": peak,
                            "converters": n_best}
    # two processes, as the stages run (and on a cluster run as two jobs)
    floor = r["write_s"] + r["matmul_s"] + r["startup_s"] + r["ingest_startup_s"]
    r["files_to_kernel"]["floor_s"] = floor
    print(f"bench: files -> kernel: ingest ({n_best} converter(s)) {ing['seconds']:.2f} s + "
          f"kernel {k.seconds:.2f} s = {total:.2f} s; peak RSS above baseline "
          f"{peak / 1e9:.3f} GB; floor (durable write + kernel products + the start-ups) "
          f"{floor:.2f} s",
          flush=True)
    print(f"bench:   {r['kernel']['summary']}", flush=True)
    if not skip_reference:
        drop_cache([src])
        m = run_measured([py, "-c", REFERENCE, json.dumps([str(f) for f in files]), device,
                          str(out / "reference.npy")], env)
        r["reference"] = {"seconds": m.seconds, "peak_rss_above_baseline": m.peak_rss - base}
        print(f"bench: published method: {m.seconds:.2f} s, peak RSS above baseline "
              f"{(m.peak_rss - base) / 1e9:.3f} GB; files -> kernel / published = "
              f"{total / m.seconds:.3f} (floor {floor / m.seconds:.3f})", flush=True)
        (out / "reference.npy").unlink(missing_ok=True)
    (out / "bench-ingest.json").write_text(json.dumps(r, indent=1))
    if not keep:
        for p in (src, out / "store", kout):
            shutil.rmtree(p, ignore_errors=True)
    return r
