"""``kernelscale run``: the stages a job file names, in order: simulate, ingest, kernel,
evaluate, curve, report. Each stage's config comes from the job's one adapter
(:class:`~kernelscale.config.JobConfig`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .atomic import atomic_write_json, check_output_dir, remove_stale_temps
from .config import JobConfig, load_job


def run_job(path: str | Path, *, workdir: str | None = None, quiet: bool = False,
            device: str | None = None) -> int:
    """Run the job at ``path``; 0 on success, 1 when the ingest rejected files."""
    cfg = load_job(path, workdir)
    wd = check_output_dir(cfg.workdir, "workdir")
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"job {cfg.job.name}: workdir {wd}", file=sys.stderr)
    if cfg.simulate:
        _simulate(cfg, quiet)
    if cfg.ingest:
        from .ingestion import ingest

        summary = ingest(cfg.ingest_config(show_progress=not quiet))
        print(summary.line())
        if summary.errors:
            return 1
    if cfg.kernel:
        from .kernel import compute_kernel

        print(compute_kernel(cfg.kernel_config(device, not quiet)).line())
    run_after_kernel(cfg, quiet=quiet, device=device)
    print(f"job {cfg.job.name}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def run_after_kernel(cfg: JobConfig, *, quiet: bool, device: str | None = None) -> None:
    """The stages that read a finished kernel: evaluate, curve, report (those the job has)."""
    if cfg.evaluate:
        _evaluate(cfg, quiet, device)
    if cfg.curve:
        from .curve import compute_curve, curve_table

        doc = compute_curve(cfg.curve_config(device, not quiet))
        print(curve_table(doc))
        print(f"curve: {doc.path}", file=sys.stderr)
    if cfg.report:
        _report(cfg, quiet, device)


def _simulate(cfg: JobConfig, quiet: bool) -> None:
    from .simulation import simulate

    s = cfg.simulate
    out = Path(cfg.path_of(s.out))
    if (out / "labels.npz").exists():
        print(f"simulate: {out} exists; kept", file=sys.stderr)
        return
    simulate(out, runs=s.runs, files=s.files, n_train=s.n_train, n_test=s.n_test,
             classes=s.classes, seed=s.seed, progress=not quiet)


def _evaluate(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .evaluation import evaluate
    from .labels import load_labels
    from .store import Store

    e = cfg.evaluate
    st = Store.open(cfg.store_path)
    labels = load_labels(cfg.labels_spec(), n_train=st.shape.n_train,
                         n_test=st.shape.n_test, classes=st.shape.classes)
    options = cfg.evaluate_options()
    if options["train_kernel"] is not None:
        _train_kernel(cfg, Path(options["train_kernel"]), quiet, device)
    ev = evaluate(cfg.store_path, cfg.kernel_path, labels, **options,
                  device=device or (cfg.kernel.device if cfg.kernel else "auto"),
                  show_progress=not quiet)
    print(ev.table())
    if e.json:
        out = Path(cfg.path_of(e.json))
        # a gather killed while writing this file left its temp: the requeued run tidies
        remove_stale_temps(out)
        atomic_write_json(out, ev.as_json(per_run=e.per_run))
        print(f"results: {out}", file=sys.stderr)


def _train_kernel(cfg: JobConfig, path: Path, quiet: bool, device: str | None) -> None:
    """The train x train kernel of the job's kernel options at ``path`` (reused when it
    is there and finished): leave-one-out selection needs it."""
    from .kernel import compute_kernel

    print(compute_kernel(cfg.kernel_config(device, not quiet, out=path, pairs="train-train",
                                           tile=None, chunks=None, rows=None,
                                           cols=None)).line())


def _report(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .report import build_report

    rc = cfg.report_config(device, not quiet)
    if rc.train_kernel is not None:
        _train_kernel(cfg, rc.train_kernel, quiet, device)
    path = build_report(rc)
    print(f"report: {path.resolve()}")
