"""``kernelscale run``: the stages a job file names, in order: simulate, ingest, kernel,
evaluate, compare, curve, report, publish -- or those of ``--only``. Each stage's config
comes from the job's one adapter (:class:`~kernelscale.config.JobConfig`).

:func:`plan_run` says which stages run and what each reads and writes; a stage whose
input neither exists nor is written by an earlier stage of the same run is refused
before anything runs (:class:`~kernelscale.errors.MissingInputError`). ``run --dry-run``
prints :meth:`RunPlan.text`: the resolved job as a job file, and the stages.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_json, check_output_dir, remove_stale_temps
from .config import STAGES, JobConfig, job_toml
from .errors import ConfigError, MissingInputError
from .sources.base import is_local_spec


@dataclass(frozen=True)
class StageInput:
    """Something a stage reads: ``what`` (``store``, ``kernel``, ``source``,
    ``comparison``, and what ``publish`` uploads) at ``path`` (a local path or an
    ``hf://`` kernel, which is not looked up before it is read)."""

    what: str
    path: str
    #: the earlier stage of this run that writes it, else None
    made_by: str | None
    #: there now (a store with its manifest, a finished kernel, a source folder)
    present: bool

    @property
    def ok(self) -> bool:
        return self.made_by is not None or self.present

    def note(self) -> str:
        if not is_local_spec(self.path):
            return f"{self.what} {self.path} (on the Hub)"
        if self.made_by is not None:
            return f"{self.what} {self.path} (from {self.made_by})"
        return f"{self.what} {self.path} ({'there' if self.present else 'missing'})"


@dataclass(frozen=True)
class StageStep:
    """One stage of a run: its name, what it reads and what it writes."""

    name: str
    reads: tuple[StageInput, ...]
    writes: tuple[str, ...]

    def line(self) -> str:
        parts = []
        if self.reads:
            parts.append("reads " + ", ".join(r.note() for r in self.reads))
        if self.writes:
            parts.append("writes " + ", ".join(self.writes))
        return f"{self.name:<9} " + "; ".join(parts)


@dataclass(frozen=True)
class RunPlan:
    """The stages a run of ``cfg`` runs, in order; ``only``: as ``--only`` chose them."""

    cfg: JobConfig
    steps: tuple[StageStep, ...]
    only: tuple[str, ...]
    #: (path, stage) for what every stage of the job writes, run or not
    writers: tuple[tuple[str, str], ...] = ()

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def check(self) -> None:
        """Refuse (one line) a stage whose input is neither there nor made before it."""
        for step in self.steps:
            for r in step.reads:
                if r.ok:
                    continue
                maker = dict(self.writers).get(r.path)
                how = f"; run the {maker} stage first (--only {maker})" if maker else ""
                which = "--only " + ",".join(self.only) if self.only else "run"
                state = ("not a finished kernel" if r.what == "kernel" and Path(r.path).exists()
                         else "missing")
                raise MissingInputError(f"{which}: the {step.name} stage reads the {r.what} "
                                        f"{r.path}, which is {state}{how}")

    def text(self) -> str:
        """The resolved job as TOML (``run`` accepts it) after comment lines naming the
        job file, the overrides and the stages in order."""
        cfg = self.cfg
        head = [f"# the job {cfg.path.resolve() if cfg.path else cfg.where}"
                + (" with " + " ".join(f"--set {s}" for s in cfg.sets) if cfg.sets else ""),
                f"# workdir {cfg.workdir.resolve()}",
                "# stages, in order (--dry-run runs none of them):"]
        head += [f"#   {i}. {s.line()}" for i, s in enumerate(self.steps, 1)]
        left = [s for s in STAGES if getattr(cfg, s) is not None and s not in self.stages]
        if left:
            head.append(f"# not run (--only): {', '.join(left)}")
        return "\n".join(head) + "\n\n" + job_toml(cfg)


def select_stages(cfg: JobConfig, only: Sequence[str] = ()) -> tuple[str, ...]:
    """The stages to run, in pipeline order: the job's, or those ``only`` names (each
    item one stage or several comma-separated), which the job must have."""
    have = [s for s in STAGES if getattr(cfg, s) is not None]
    if not only:
        return tuple(have)
    named: set[str] = set()
    for item in only:
        for s in (x.strip() for x in item.split(",")):
            if s not in STAGES:
                raise ConfigError(f"--only {item}: {s!r} is not a stage (stages: "
                                  f"{', '.join(STAGES)})")
            if s not in have:
                raise ConfigError(f"--only {item}: the job {cfg.where} has no [{s}] table")
            named.add(s)
    return tuple(s for s in STAGES if s in named)


def plan_run(cfg: JobConfig, only: Sequence[str] = ()) -> RunPlan:
    """Which stages a run of ``cfg`` runs and what each reads and writes (nothing is
    read but the existence of the inputs); :meth:`RunPlan.check` refuses missing ones."""
    stages = select_stages(cfg, only)
    made: dict[str, str] = {}  # path -> the stage of this run that writes it
    steps = []

    def need(what: str, path: str | Path, present) -> StageInput:
        path = _abs(path)
        if path in made:
            return StageInput(what, path, made[path], False)
        return StageInput(what, path, None, not is_local_spec(path) or present(path))

    for name in stages:
        reads: list[StageInput] = []
        if name == "ingest":
            src = cfg.path_of(cfg.ingest.source)
            if is_local_spec(src):
                reads.append(need("source", src, lambda p: Path(p).exists()))
        elif name == "compare":
            reads.append(need("kernel", cfg.kernel_path, _kernel_finished))
            reads += [need("kernel", k, _kernel_finished) for k, _ in cfg.compare_targets()]
        elif name == "publish":
            # the workdir itself is made by the run
            reads += [need(what, path, _PRESENT[what]) for what, path in cfg.publish_items()
                      if what != "workdir"]
        elif name != "simulate":
            reads.append(need("store", cfg.store_path, _store_present))
            if name in ("evaluate", "report"):
                reads.append(need("kernel", cfg.kernel_path, _kernel_finished))
                tk = getattr(cfg, name).train_kernel
                if tk and not is_local_spec(cfg.path_of(tk)):
                    reads.append(need("kernel", cfg.path_of(tk), _kernel_finished))
            if name == "report" and cfg.comparison() is not None:
                reads.append(need("comparison", cfg.comparison(), lambda p: Path(p).exists()))
        writes = _writes(cfg, name)
        for w in writes:
            made.setdefault(w, name)
        steps.append(StageStep(name, tuple(reads), tuple(writes)))
    if "kernel" in stages:
        cfg.kernel_config(show_progress=False).validate()  # a bad pairs, device... now
    writers = {w: s for s in reversed(select_stages(cfg)) for w in _writes(cfg, s)}
    return RunPlan(cfg, tuple(steps), tuple(only), tuple(writers.items()))


def _writes(cfg: JobConfig, name: str) -> list[str]:
    """What stage ``name`` of the job writes (absolute paths; publish: its repo)."""
    if name == "simulate":
        out = [cfg.simulate.out]
    elif name == "ingest":
        out = [cfg.ingest.store]
    elif name == "kernel":
        out = [cfg.kernel.out]
    elif name == "curve":
        out = [cfg.curve.out]
    elif name == "compare":
        return [_abs(out / "compare.json") for _, out in cfg.compare_targets() if out]
    elif name == "publish":
        p = cfg.publish
        return [p.repo + (f" (branch {p.revision})" if p.revision else "")]
    elif name == "evaluate":
        e = cfg.evaluate
        out = [e.json or None, e.train_kernel, e.ablations]
    else:
        r = cfg.report
        out = [r.out, r.train_kernel, r.ablations]
    return [_abs(cfg.path_of(p)) for p in out if p and is_local_spec(cfg.path_of(p))]


def _abs(path: str | Path) -> str:
    """A local path made absolute (not resolving links); other specs as they are."""
    return os.path.abspath(path) if is_local_spec(str(path)) else str(path)


def _store_present(path: str) -> bool:
    from .store import Store

    return Store.exists(path)


def _kernel_finished(path: str) -> bool:
    from .errors import KernelscaleError
    from .kernelread import load_kernel

    if not (Path(path) / "zarr.json").is_file():
        return False
    try:
        load_kernel(path)
    except KernelscaleError:
        return False
    return True


#: whether what the publish stage uploads is there, by its kind
_PRESENT = {"kernel": _kernel_finished,
            "results": lambda p: Path(p).is_file(),
            "report": lambda p: (Path(p) / "report.json").is_file()}

#: the stages that read a finished kernel, in order
AFTER_KERNEL = ("evaluate", "compare", "curve", "report", "publish")


def run_job(cfg: JobConfig, plan: RunPlan | None = None, *, quiet: bool = False,
            device: str | None = None) -> int:
    """Run the stages of ``plan`` (default: every stage of the job); 0 on success, 1 when
    the ingest rejected files."""
    plan = plan or plan_run(cfg)
    plan.check()
    wd = check_output_dir(cfg.workdir, "workdir")
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"job {cfg.job.name}: workdir {wd}", file=sys.stderr)
    if plan.only:
        print(f"job {cfg.job.name}: only {', '.join(plan.stages)}", file=sys.stderr)
    stages = plan.stages
    if "simulate" in stages:
        _simulate(cfg, quiet)
    if "ingest" in stages:
        from .ingestion import ingest

        summary = ingest(cfg.ingest_config(show_progress=not quiet))
        print(summary.line())
        if summary.errors:
            return 1
    if "kernel" in stages:
        from .kernel import compute_kernel

        print(compute_kernel(cfg.kernel_config(device, not quiet)).line())
    run_after_kernel(cfg, quiet=quiet, device=device,
                     stages=[s for s in stages if s in AFTER_KERNEL])
    print(f"job {cfg.job.name}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def run_after_kernel(cfg: JobConfig, *, quiet: bool, device: str | None = None,
                     stages: Sequence[str] | None = None) -> None:
    """The stages that read a finished kernel: evaluate, compare, curve, report, then
    publish (those the job has, or those of ``stages``)."""
    from .share import run_compare, run_publish

    def on(name: str) -> bool:
        return getattr(cfg, name) is not None and (stages is None or name in stages)

    if on("evaluate"):
        _evaluate(cfg, quiet, device)
    if on("compare"):
        run_compare(cfg, quiet)
    if on("curve"):
        from .curve import compute_curve, curve_table

        doc = compute_curve(cfg.curve_config(device, not quiet))
        print(curve_table(doc))
        print(f"curve: {doc.path}", file=sys.stderr)
    if on("report"):
        _report(cfg, quiet, device)
    if on("publish"):
        run_publish(cfg, quiet)


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
    options = cfg.evaluate_options(device)
    if options["train_kernel"] is not None:
        options["train_kernel"] = _train_kernel(cfg, options["train_kernel"], quiet, device)
    ev = evaluate(cfg.store_path, cfg.kernel_path, labels, **options,
                  show_progress=not quiet)
    print(ev.table())
    if e.json:
        out = Path(cfg.path_of(e.json))
        # a gather killed while writing this file left its temp: the requeued run tidies
        remove_stale_temps(out)
        atomic_write_json(out, ev.as_json(per_run=e.per_run))
        print(f"results: {out}", file=sys.stderr)


def _train_kernel(cfg: JobConfig, spec: str | Path, quiet: bool,
                  device: str | None) -> Path:
    """The train x train kernel at ``spec``, which leave-one-out selection needs: an
    ``hf://`` one fetched and verified, a local one computed with the job's kernel
    options (reused when it is there and finished)."""
    from .hubkernel import is_hub_kernel, local_kernel
    from .kernel import compute_kernel

    if is_hub_kernel(spec):
        return Path(local_kernel(spec, quiet=quiet))
    print(compute_kernel(cfg.kernel_config(device, not quiet, out=Path(spec),
                                           pairs="train-train", tile=None, chunks=None,
                                           rows=None, cols=None)).line())
    return Path(spec)


def _report(cfg: JobConfig, quiet: bool, device: str | None) -> None:
    from .report import build_report

    rc = cfg.report_config(device, not quiet)
    if rc.train_kernel is not None:
        rc = dataclasses.replace(rc, train_kernel=_train_kernel(cfg, rc.train_kernel, quiet,
                                                                device))
    path = build_report(rc)
    print(f"report: {path.resolve()}")
