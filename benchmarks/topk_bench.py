"""Top-K kernels against full kernels: wall time, peak RSS and output bytes as the train
set grows; and the ImageNet-shaped rehearsal (1,000 classes) against float64.

    python benchmarks/topk_bench.py [--n-train 5000,20000,50000,100000] [--runs 200]
                                    [--n-test 1000] [--k 100] [--rehearsal] [--work DIR]

Each kernel is its own ``kernelscale kernel`` process on the CPU; its peak RSS is the
process's own (``wait4``), its time the process's wall time (start-up included, the
same for both kinds). Output bytes: the kernel array's chunk files for a full kernel;
``values`` + ``indices`` (the format's n_test x K x 12 bytes) for a top-K kernel, and
beside it the tiles' partial top-Ks it keeps for repairs.

The rehearsal (``--rehearsal``): C = 1000, 2,000 test x 20,000 train, 32 runs. Full and
top-K kernels are computed and compared (values, index sets), and both against a
float64 evaluation of the formula for a sample of rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def folder_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def run_measured(*args: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of ``kernelscale ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out_path = Path(tempfile.mkstemp(prefix="ks-bench-")[1])
    with open(out_path, "w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "kernelscale", "-q", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    out_path.unlink()
    if proc.returncode:
        raise SystemExit(f"kernelscale {' '.join(args)} failed ({proc.returncode}):\n{text}")
    return wall, usage.ru_maxrss * 1024, text


def both_kernels(store: Path, full: Path, top: Path, k: int):
    """((seconds, peak RSS) of the full kernel, (seconds, peak RSS) of the top-k one)."""
    for p in (full, top):
        shutil.rmtree(p, ignore_errors=True)
    res = []
    for out, extra in ((full, ()), (top, ("--topk", str(k)))):
        wall, rss, _ = run_measured("kernel", "--store", str(store), "--out", str(out),
                                    "--device", "cpu", *extra)
        res.append((wall, rss))
    return res


def dataset(work: Path, runs: int, n_test: int, n_train: int, classes: int) -> Path:
    from kernelscale.bench import write_synthetic
    from kernelscale.ingestion import IngestConfig, ingest

    src = work / f"src-{n_test}x{n_train}x{classes}-{runs}"
    store = work / f"store-{n_test}x{n_train}x{classes}-{runs}"
    if not (store / "manifest.json").exists():
        write_synthetic(src, runs, n_test, n_train, classes, runs_per_file=min(runs, 100))
        ingest(IngestConfig(src, store, show_progress=False))
        shutil.rmtree(src)
    return store


def scaling(work: Path, a) -> None:
    print(f"top-{a.k} vs full kernels: n_test {a.n_test}, C 10, {a.runs} runs, CPU, one "
          "process each")
    print(f"{'n_train':>8} {'kind':>5} {'wall s':>8} {'peak RSS':>9} {'output':>10} "
          f"{'partials':>9} {'time ratio':>10}")
    rows = []
    for n_train in a.n_train:
        store = dataset(work, a.runs, a.n_test, n_train, 10)
        full, top = work / f"full-{n_train}", work / f"top-{n_train}"
        (tf, rf), (tt, rt) = both_kernels(store, full, top, a.k)
        bf = folder_bytes(full / "kernel")
        bt = folder_bytes(top / "values", top / "indices")
        bp = folder_bytes(top / ".partial")
        rows.append((n_train, tf, rf, tt, rt))
        print(f"{n_train:>8} {'full':>5} {tf:8.2f} {rf / 2**20:7.0f}Mi {bf / 2**20:8.1f}Mi "
              f"{'':>9} {'':>10}")
        print(f"{n_train:>8} {'top-K':>5} {tt:8.2f} {rt / 2**20:7.0f}Mi {bt / 2**20:8.2f}Mi "
              f"{bp / 2**20:7.2f}Mi {tt / tf:10.3f}")
        print(f"{'':>8} n_test x K x 12 = {a.n_test * a.k * 12 / 2**20:.2f} MiB; values + "
              f"indices chunk files (CRC-32C included) {bt / 2**20:.2f} MiB")
        if not a.keep:
            shutil.rmtree(full)
    rss = [r[4] for r in rows]
    print(f"top-K peak RSS: min {min(rss) / 2**20:.0f} MiB, max {max(rss) / 2**20:.0f} MiB, "
          f"spread {(max(rss) - min(rss)) / min(rss):.1%} (goal <= 10%); <= full at every "
          f"size: {all(r[4] <= r[2] for r in rows)}; time ratio max "
          f"{max(r[3] / r[1] for r in rows):.3f} (goal <= 1.1)")


def rehearsal(work: Path, a) -> None:
    import zarr

    from kernelscale.store import Store
    from kernelscale.topk import top_neighbours

    runs, n_test, n_train, C = 32, 2000, 20000, 1000
    print(f"\nrehearsal: C {C}, {n_test} test x {n_train} train, {runs} runs, CPU")
    t0 = time.perf_counter()
    store = dataset(work, runs, n_test, n_train, C)
    print(f"  data: {time.perf_counter() - t0:.1f} s")
    full, top = work / "rehearsal-full", work / "rehearsal-top"
    (tf, rf), (tt, rt) = both_kernels(store, full, top, a.k)
    K = zarr.open_group(str(full), mode="r")["kernel"][...]
    g = zarr.open_group(str(top), mode="r")
    v, i = g["values"][...], g["indices"][...]
    nb = top_neighbours(K, a.k)
    same_sets = np.mean([set(x) == set(y) for x, y in zip(nb.index, i, strict=True)])
    dv = float(np.abs(v - np.take_along_axis(K, i, axis=1)).max())
    print(f"  full kernel {tf:.2f} s, peak RSS {rf / 2**20:.0f} MiB; top-{a.k} kernel "
          f"{tt:.2f} s, peak RSS {rt / 2**20:.0f} MiB")
    print(f"  top-K vs full: max |value difference| {dv:.2e} (goal <= 1e-6); index sets equal "
          f"in {same_sets:.2%} of rows; bitwise equal top-K: "
          f"{np.array_equal(nb.index, i) and np.array_equal(nb.values, v)}")
    # float64 evaluation of the formula for a sample of rows; the statistics of an
    # (example, class) are over runs only, so the train examples go in blocks
    s = Store.open(store)
    rows = np.sort(np.random.default_rng(0).choice(n_test, a.sample, replace=False))

    def z(split, lo, hi, sel=slice(None)):
        x = s.read(split, 0, runs, slice(lo, hi)).astype(np.float64)[:, sel]
        x = x - x.max(axis=2, keepdims=True)
        x = x - np.log(np.exp(x).sum(axis=2, keepdims=True))
        sd = x.std(axis=0, ddof=1)
        return np.where(sd > 0, (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1), 0.0)

    zt = z("test", 0, n_test, rows)
    ref = np.empty((rows.size, n_train))
    for j in range(0, n_train, 1000):
        zr = z("train", j, min(j + 1000, n_train))
        ref[:, j:j + zr.shape[1]] = np.einsum("ric,rjc->ij", zt, zr, optimize=True)
    ref /= C * runs
    err_full = float(np.abs(K[rows] - ref).max())
    err_top = float(np.abs(v[rows] - np.take_along_axis(ref, i[rows], axis=1)).max())
    print(f"  float64 formula on {rows.size} rows x {n_train}: full kernel max error "
          f"{err_full:.2e}, top-K values {err_top:.2e} (goal <= 1e-5)")
    if not a.keep:
        shutil.rmtree(full)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", default="5000,20000,50000,100000",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rehearsal", action="store_true", help="also the C = 1000 rehearsal")
    ap.add_argument("--only-rehearsal", action="store_true")
    ap.add_argument("--sample", type=int, default=50, help="rehearsal rows checked in float64")
    ap.add_argument("--keep", action="store_true", help="keep the full kernels")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="ks-topk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not a.only_rehearsal:
        scaling(work, a)
    if a.rehearsal or a.only_rehearsal:
        rehearsal(work, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
