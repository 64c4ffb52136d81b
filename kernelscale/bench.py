"""``kernelscale bench``: the kernel engine against the published reference and its floors.

Every figure is measured in the same invocation, on the same data and machine:

* **reference**: the published code as written (``torch.load`` every file, normalise,
  10 per-class matmuls), run in a subprocess; wall time and peak RSS.
* **kernelscale**: ``kernelscale kernel`` on a store of the same runs, in a subprocess;
  wall time, peak RSS and its own stage timings.
* **floors**: reading the store's bytes (page cache dropped first), and normalise + GEMM
  on the same data already in memory; the engine's accumulate time is compared with the
  larger of the two (reading should overlap compute).
* **scaling**: kernelscale's time and peak RSS as the runs grow (files of 500 runs are
  added to one store).

Peak RSS is reported above a baseline: a Python process that imports the same libraries.
Results are printed and written to ``OUT/bench.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE = r'''
import glob, sys, time, json
import numpy as np
import torch
files, device, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

def normalize(logits):
    logits = logits.float()
    logits = logits.log_softmax(-1)
    logits = (logits - logits.mean(0, keepdim=True)) / logits.std(0, keepdim=True)
    return logits

def compute_kernel(logits1, logits2):
    logits1 = normalize(logits1)
    logits2 = normalize(logits2)
    assert len(logits1) == len(logits2)
    kernel = torch.zeros(logits1.shape[1], logits2.shape[1]).to(device)
    for c in range(logits1.shape[-1]):
        logits1_cls = logits1[..., c].to(device)
        logits2_cls = logits2[..., c].to(device)
        corr_cls = (logits1_cls.T @ logits2_cls) / len(logits1)
        kernel += corr_cls / logits1.shape[-1]
    return kernel

for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 1):  # > 1: warm timings too
    t0 = time.perf_counter()
    objs = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    test = torch.cat([o["logits"] for o in objs])
    train = torch.cat([o["logits_train"] for o in objs])
    del objs
    t1 = time.perf_counter()
    kernel = compute_kernel(test, train)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    host = kernel.cpu().numpy()
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "compute_s": t2 - t1, "total_s": t3 - t0}),
          flush=True)
    del test, train, kernel
np.save(out, host)
'''

#: a process of kernelscale's imports, exiting as the ``kernelscale`` program does (without
#: the final collection of what it imported: :func:`kernelscale.cli.command`)
BASELINE = ("import numpy, torch, zarr, kernelscale.kernel, kernelscale.store; "
            "import gc; gc.freeze()")


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict | None = None) -> Measured:
    """Run ``cmd``; wall time and the child's own peak RSS (``os.wait4``).

    ``subprocess`` starts the child without ``fork()`` in this (multi-threaded)
    process; the child is reaped with ``wait4`` to get its own resource usage.
    """
    import subprocess
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    got: dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        with stream:
            got[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s))
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    dt = time.perf_counter() - t0
    out = got["out"].decode(errors="replace")
    err = got["err"].decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited {proc.returncode}: {err[-2000:]}")
    return Measured(dt, int(ru.ru_maxrss) * 1024, out, err)


def drop_cache(paths: list[Path]) -> None:
    """Evict files from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_synthetic(src: Path, runs: int, n_test: int, n_train: int, classes: int,
                    runs_per_file: int = 500, seed: int = 0) -> list[Path]:
    """Hub-layout files of random float16 logits (content does not matter for timing)."""
    import torch

    rng = np.random.default_rng(seed)
    paths = []
    for f, s in enumerate(range(0, runs, runs_per_file)):
        r = min(runs_per_file, runs - s)
        p = src / "logs_saveoutputs_main" / f"{f:05d}" / "log.pt"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            te = (rng.standard_normal((r, n_test, classes), dtype=np.float32) * 3).astype(
                np.float16)
            tr = (rng.standard_normal((r, n_train, classes), dtype=np.float32) * 3).astype(
                np.float16)
            torch.save({"logits": torch.from_numpy(te), "logits_train": torch.from_numpy(tr),
                        "code": "synthetic"}, p)
        paths.append(p)
    return paths


def read_floor(store: Path) -> tuple[float, int]:
    """Seconds and bytes to read every logits chunk file of the store once, cold."""
    files = sorted(p for p in (store / "logits").rglob("*") if p.is_file()
                   and p.name != "zarr.json")
    drop_cache([store / "logits"])
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(mv):
                total += n
    return time.perf_counter() - t0, total


def compute_floor(store_path: Path, device_name: str, precision: str) -> float:
    """Seconds to normalise + GEMM all runs already in device memory, with the engine's
    own code and plan (run-chunk length, padded operands, float64 accumulation)."""
    import torch

    from .accumulate import (
        add_product,
        fill_operand,
        on_device,
        operand_padding,
        padded,
        target_reductions,
    )
    from .device import matmul_precision, resolve_device
    from .normalise import Normaliser
    from .plan import plan
    from .store import Store

    store = Store.open(store_path)
    device = resolve_device(device_name)
    runs, (n_te, n_tr, C) = store.runs, (store.shape.n_test, store.shape.n_train,
                                         store.shape.classes)
    pad = operand_padding(device)
    p = plan((n_te, n_tr), classes=C, budget=1 << 62, chunks=(n_te, n_tr),
             store_run_chunk=store.shape.run_chunk, runs=runs,
             target_reduction=target_reductions(device)[0], pad=pad)
    k = p.runs_per_step
    with on_device(device), matmul_precision(precision):
        te = torch.from_numpy(store.read("test", 0, runs)).to(device)
        tr = torch.from_numpy(store.read("train", 0, runs)).to(device)
        nt = Normaliser(store.stats("test"), (0, n_te), None, device, store.transform)
        nr = Normaliser(store.stats("train"), (0, n_tr), None, device, store.transform)
        op_t = torch.zeros((n_te, padded(k * C, pad)), dtype=torch.float32, device=device)
        op_r = torch.zeros((n_tr, padded(k * C, pad)), dtype=torch.float32, device=device)
        acc = torch.zeros((n_te, n_tr), dtype=torch.float64, device=device)
        scratch = None
        best = float("inf")
        for _ in range(2):  # the first pass also pays for first-touch allocations
            acc.zero_()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for s in range(0, runs, k):
                e = min(s + k, runs)
                scratch = add_product(acc, fill_operand(nt, te[s:e], op_t, pad),
                                      fill_operand(nr, tr[s:e], op_r, pad), scratch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return best


_SUMMARY = re.compile(r"seconds read (?P<read>[\d.]+) \(waited (?P<wait>[\d.]+)\) normalise "
                      r"(?P<norm>[\d.]+) gemm (?P<gemm>[\d.]+) write (?P<write>[\d.]+) "
                      r"checkpoint (?P<ckpt>[\d.]+) total (?P<total>[\d.]+)")


#: written first into a bench's --out: its src/, store/ and kernel-*/ may be replaced later
MARKER = ".kernelscale-bench"


def _claim(out: Path) -> None:
    """Make ``out`` a bench folder; refuse a folder with other content (its files are
    not kernelscale's to replace)."""
    from .atomic import check_output_dir
    from .errors import BadInputError

    check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise BadInputError(f"{out}: exists and is not a kernelscale bench folder; choose "
                            "another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def run_bench(out: Path, *, n_test: int, n_train: int, runs: int, classes: int,
              device: str, precision: str, scaling: list[int], skip_reference: bool,
              keep: bool) -> dict:
    py = sys.executable
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    _claim(out)
    src, store = out / "src", out / "store"
    all_runs = sorted(set(scaling) | {runs})
    t0 = time.perf_counter()
    files = write_synthetic(src, max(all_runs), n_test, n_train, classes)
    print(f"bench: data {len(files)} file(s), {max(all_runs)} runs, test {n_test}, train "
          f"{n_train}, classes {classes} ({time.perf_counter() - t0:.1f} s to write)",
          flush=True)
    shutil.rmtree(store, ignore_errors=True)
    results: dict = {"machine": _machine(device), "shape": [n_test, n_train, classes],
                     "device": device, "precision": precision, "scaling": []}
    base = run_measured([py, "-c", BASELINE], env)
    results["baseline_rss"] = base.peak_rss
    kernel_bytes = n_test * n_train * 4

    def ours(r: int) -> dict:
        kout = out / f"kernel-{r}"
        shutil.rmtree(kout, ignore_errors=True)
        drop_cache([store])
        m = run_measured([py, "-m", "kernelscale", "-q", "kernel", "--store", str(store),
                           "--out", str(kout), "--device", device, "--precision", precision],
                          env)
        st = _SUMMARY.search(m.stdout)
        d = {"runs": r, "seconds": m.seconds, "peak_rss_above_baseline": m.peak_rss - base.peak_rss,
             "summary": m.stdout.strip()}
        if st:
            d.update({k: float(v) for k, v in st.groupdict().items()})
        return d

    from .ingestion import IngestConfig, ingest

    main = None
    for r in all_runs:
        n_files = -(-r // 500)
        ingest(IngestConfig(src, store, max_files=n_files, show_progress=False))
        d = ours(r)
        results["scaling"].append(d)
        print(f"bench: kernelscale {r:6d} runs  {d['seconds']:7.2f} s  peak RSS above baseline "
              f"{d['peak_rss_above_baseline'] / 1e9:6.3f} GB", flush=True)
        if r == runs:
            main = d
            rd, nbytes = read_floor(store)
            cf = compute_floor(store, device, precision)
            results["floors"] = {"read_s": rd, "read_bytes": nbytes, "compute_s": cf}
            if not skip_reference:
                ref_files = [str(f) for f in files[:n_files]]
                drop_cache([src])
                m = run_measured([py, "-c", REFERENCE, json.dumps(ref_files), device,
                                   str(out / "reference.npy")], env)
                rj = json.loads(m.stdout.strip().splitlines()[0])
                results["reference"] = {"seconds": m.seconds, **rj,
                                        "peak_rss_above_baseline": m.peak_rss - base.peak_rss}
                import zarr
                ours_k = zarr.open_group(str(out / f"kernel-{r}"), mode="r")["kernel"][...]
                ref_k = np.load(out / "reference.npy")
                results["max_abs_diff_vs_reference"] = float(np.abs(ours_k - ref_k).max())
    assert main is not None
    results["main"] = main
    _print_report(results, kernel_bytes)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    if not keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return results


def _machine(device: str) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{os.cpu_count()} x {cpu}, torch {torch.__version__}"
    if device != "cpu" and torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name()}"
    return s


def _print_report(r: dict, kernel_bytes: int) -> None:
    m, f = r["main"], r["floors"]
    print(f"bench: machine {r['machine']}")
    print(f"bench: shape (test, train, classes) = {tuple(r['shape'])}, runs {m['runs']}, "
          f"device {r['device']}, precision {r['precision']}")
    if "reference" in r:
        ref = r["reference"]
        print(f"bench: reference      {ref['seconds']:7.2f} s (load {ref['load_s']:.2f}, compute "
              f"{ref['compute_s']:.2f})  peak RSS above baseline "
              f"{ref['peak_rss_above_baseline'] / 1e9:.3f} GB")
        print(f"bench: kernelscale    {m['seconds']:7.2f} s  peak RSS above baseline "
              f"{m['peak_rss_above_baseline'] / 1e9:.3f} GB  (kernel {kernel_bytes / 1e9:.3f} GB"
              f" + 0.5 GB = {(kernel_bytes + 0.5e9) / 1e9:.3f} GB allowed)")
        print(f"bench: time ratio kernelscale / reference = {m['seconds'] / ref['seconds']:.3f}")
        print(f"bench: max |kernelscale - reference| = {r['max_abs_diff_vs_reference']:.2e}")
    acc = m.get("total", m["seconds"]) - m.get("write", 0.0)
    floor = max(f["read_s"], f["compute_s"])
    print(f"bench: floors: read {f['read_bytes'] / 1e9:.3f} GB cold in {f['read_s']:.2f} s "
          f"({f['read_bytes'] / max(f['read_s'], 1e-9) / 1e9:.2f} GB/s); normalise+GEMM in "
          f"memory {f['compute_s']:.2f} s")
    print(f"bench: accumulate {acc:.2f} s = {acc / floor:.3f} x max(read, compute) floor "
          f"({floor:.2f} s)")
    rows = r["scaling"]
    if len(rows) > 2:
        x = np.array([d["runs"] for d in rows], dtype=float)
        y = np.array([d["seconds"] for d in rows])
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (slope * x + icpt)
        r2 = 1 - (resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
        mem = [d["peak_rss_above_baseline"] for d in rows]
        print(f"bench: scaling fit: seconds = {icpt:.2f} + {slope * 1000:.3f} per 1000 runs "
              f"(R^2 {r2:.3f}); peak RSS above baseline {min(mem) / 1e9:.3f}.."
              f"{max(mem) / 1e9:.3f} GB")
    if len(rows) > 1:
        b = rows[0]
        for d in rows:
            print(f"bench: scaling runs {d['runs']:6d}: {d['seconds']:7.2f} s "
                  f"({d['seconds'] / b['seconds']:.2f}x for {d['runs'] / b['runs']:.1f}x runs), "
                  f"peak RSS above baseline {d['peak_rss_above_baseline'] / 1e9:.3f} GB")
