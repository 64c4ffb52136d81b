"""Run the stages a job file names, in order: simulate, ingest, kernel, evaluate, curve,
report."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .atomic import atomic_write_json
from .cli import parse_bytes, parse_shape
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
    run_after_kernel(cfg, quiet, device)
    print(f"job {cfg.job.name}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


def run_after_kernel(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    """The stages that read a finished kernel: evaluate, curve, report (those the job has)."""
    if cfg.evaluate:
        _evaluate(cfg)
    if cfg.curve:
        _curve(cfg, quiet, device)
    if cfg.report:
        _report(cfg, quiet, device)


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
    if i.source.startswith("hf://"):
        from .hub import ingest_hub

        summary = ingest_hub(i.source, cfg.resolve(i.store), glob=i.glob,
                             max_files=i.max_files, max_runs=i.max_runs, revision=i.revision,
                             cache_dir=cfg.resolve(i.cache_dir) if i.cache_dir else None,
                             workers=i.download_workers, retries=i.retries,
                             keep_downloads=i.keep_downloads, skip_bad=i.skip_bad,
                             run_chunk=i.run_chunk, show_progress=not quiet,
                             shape=parse_shape(i.shape))
        print(summary.line())
        return 1 if summary.errors else 0
    from .parallel import parallel_preparer

    with parallel_preparer(i.workers, i.scheduler) as preparer:
        summary = ingest_local(cfg.resolve(i.source), cfg.resolve(i.store), glob=i.glob,
                               max_files=i.max_files, max_runs=i.max_runs,
                               skip_bad=i.skip_bad, run_chunk=i.run_chunk,
                               show_progress=not quiet, preparer=preparer,
                               shape=parse_shape(i.shape))
    print(summary.line())
    return 1 if summary.errors else 0


def kernel_config(cfg: JobConfig, device: str | None = None, quiet: bool = False):  # noqa: ANN201
    """The :class:`~kernelscale.kernel.KernelConfig` of the job's ``[kernel]`` table."""
    from .cli import parse_pair
    from .kernel import KernelConfig

    k = cfg.kernel
    return KernelConfig(store=Path(cfg.resolve(cfg.ingest.store if cfg.ingest else "store")),
                        out=Path(cfg.resolve(k.out)), runs=k.runs, pairs=k.pairs,
                        device=device or k.device, precision=k.precision,
                        max_memory=parse_bytes(k.max_memory) if k.max_memory else None,
                        tile=parse_pair(k.tile, "tile"), chunks=parse_pair(k.chunks, "chunks"),
                        run_chunk=k.run_chunk, checkpoint_every=k.checkpoint_every,
                        log_softmax_fp32=k.log_softmax_fp32, show_progress=not quiet)


def _kernel(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .kernel import compute_kernel

    print(compute_kernel(kernel_config(cfg, device, quiet)).line())


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


def _labels_spec(cfg: JobConfig, own: str | None) -> str:
    from .errors import ConfigError

    spec = own or (cfg.evaluate.labels if cfg.evaluate else None)
    if not spec:
        raise ConfigError(f"{cfg.path}: no labels: set 'labels' in [curve]/[report] or "
                          "[evaluate]")
    return cfg.resolve(spec)


def _curve(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .curve import CurveConfig, compute_curve, curve_table

    c = cfg.curve
    k = cfg.kernel
    doc = compute_curve(CurveConfig(
        store=Path(cfg.resolve(cfg.ingest.store if cfg.ingest else "store")),
        labels=_labels_spec(cfg, c.labels), runs=c.runs, out=Path(cfg.resolve(c.out)),
        k=c.k, device=device or (k.device if k else "auto"),
        precision=k.precision if k else "fp32",
        max_memory=parse_bytes(k.max_memory) if k and k.max_memory else None,
        keep_kernels=c.keep_kernels, seed=c.seed, show_progress=not quiet))
    print(curve_table(doc))
    print(f"curve: {doc['path']}", file=sys.stderr)


def _report(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .kernel import KernelConfig, compute_kernel
    from .report import ReportConfig, build_report

    r = cfg.report
    k = cfg.kernel
    store = Path(cfg.resolve(cfg.ingest.store if cfg.ingest else "store"))
    dev = device or (k.device if k else "auto")
    train_kernel = None
    if r.train_kernel:
        # the leave-one-out selection needs the train x train kernel of the same runs
        train_kernel = Path(cfg.resolve(r.train_kernel))
        s = compute_kernel(KernelConfig(
            store=store, out=train_kernel, runs=k.runs if k else None, pairs="train-train",
            device=dev, precision=k.precision if k else "fp32",
            max_memory=parse_bytes(k.max_memory) if k and k.max_memory else None,
            log_softmax_fp32=bool(k and k.log_softmax_fp32), show_progress=not quiet))
        print(s.line())
    curve = Path(cfg.resolve(cfg.curve.out)) / "curve.json" if cfg.curve else None
    path = build_report(ReportConfig(
        store=store, kernel=Path(cfg.resolve(k.out if k else "kernel")),
        labels=_labels_spec(cfg, r.labels), out=Path(cfg.resolve(r.out)),
        train_kernel=train_kernel, curve=curve,
        ablations=Path(cfg.resolve(r.ablations)) if r.ablations else None,
        images=cfg.resolve(r.images) if r.images else None, k=r.k, weighting=r.weighting,
        power=r.power, temperature=r.temperature, threshold=r.threshold,
        examples=r.examples, seed=r.seed, device=dev, show_progress=not quiet))
    print(f"report: {path.resolve()}")
