"""Run the stages a job file names, in order: simulate, ingest, kernel, evaluate."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .atomic import atomic_write_json
from .cli import parse_bytes
from .config import JobConfig, load_job


def run_job(path: str, *, workdir: str | None = None, quiet: bool = False,
            device: str | None = None) -> int:
    cfg = load_job(path, workdir)
    wd = cfg.workdir
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"job {cfg.job.name}: workdir {wd}", file=sys.stderr)
    rc = 0
    if cfg.simulate:
        rc = _simulate(cfg, quiet) or rc
    if cfg.ingest:
        rc = _ingest(cfg, quiet) or rc
        if rc:
            return rc
    if cfg.kernel:
        _kernel(cfg, quiet, device)
    if cfg.evaluate:
        _evaluate(cfg)
    print(f"job {cfg.job.name}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


def _simulate(cfg: JobConfig, quiet: bool) -> int:
    from .simulate import simulate

    s = cfg.simulate
    out = Path(cfg.resolve(s.out))
    if (out / "labels.npz").exists():
        print(f"simulate: {out} exists; kept", file=sys.stderr)
        return 0
    simulate(out, runs=s.runs, files=s.files, n_train=s.n_train, n_test=s.n_test,
             classes=s.classes, seed=s.seed, progress=not quiet)
    return 0


def _ingest(cfg: JobConfig, quiet: bool) -> int:
    from .ingest import ingest_local

    i = cfg.ingest
    summary = ingest_local(cfg.resolve(i.source), cfg.resolve(i.store), glob=i.glob,
                           max_files=i.max_files, max_runs=i.max_runs, skip_bad=i.skip_bad,
                           run_chunk=i.run_chunk, show_progress=not quiet)
    print(summary.line())
    return 1 if summary.errors else 0


def _kernel(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .kernel import KernelConfig, compute_kernel

    k = cfg.kernel
    kc = KernelConfig(store=Path(cfg.resolve(cfg.ingest.store if cfg.ingest else "store")),
                      out=Path(cfg.resolve(k.out)), runs=k.runs, pairs=k.pairs,
                      device=device or k.device, precision=k.precision,
                      max_memory=parse_bytes(k.max_memory) if k.max_memory else None,
                      checkpoint_every=k.checkpoint_every, show_progress=not quiet)
    print(compute_kernel(kc).line())


def _evaluate(cfg: JobConfig) -> None:
    from .evaluate import evaluate
    from .sources import load_labels
    from .store import Store

    e = cfg.evaluate
    store = cfg.resolve(cfg.ingest.store if cfg.ingest else "store")
    kernel = cfg.resolve(cfg.kernel.out if cfg.kernel else "kernel")
    st = Store.open(store)
    labels = load_labels(cfg.resolve(e.labels), n_train=st.shape.n_train,
                         n_test=st.shape.n_test, classes=st.shape.classes)
    ev = evaluate(store, kernel, labels, k=e.k)
    print(ev.table())
    if e.json:
        out = Path(cfg.resolve(e.json))
        atomic_write_json(out, ev.as_json())
        print(f"results: {out}", file=sys.stderr)
