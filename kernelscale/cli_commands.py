"""The ``kernelscale`` commands: each subcommand's options turned into the same stage
tables a job file holds (:func:`kernelscale.jobfields.table_from_options`), then the stage
run. Values are parsed in one place, so a stage is configured by one schema whichever
way its options arrive; :mod:`kernelscale.cli_parser` declares the options.

Each ``cmd_*`` takes the parsed :class:`argparse.Namespace` and returns the exit status;
a user error is raised as a :class:`~kernelscale.errors.KernelscaleError`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: ``kernelscale submit`` options that override keys of the job's [slurm] table
SLURM_OVERRIDES = {"partition": str, "account": str, "time": str, "mem": str, "gres": str,
                   "cpus_per_task": int, "tasks": int, "max_parallel": int,
                   "signal_lead": int, "max_requeues": int}


# ------------------------------------------------------------------------- adapters

def _job(**tables: Any):
    """A job of the command line's tables, with the current directory as workdir."""
    from .config import JobConfig, JobTable

    return JobConfig(path=None, job=JobTable(name="command line", workdir="."), **tables)


def _table(cls: type, a: argparse.Namespace, **renamed: str) -> Any:
    """Table ``cls`` from the options of ``a`` named like its fields (``renamed``: table
    field -> option dest), parsed and checked like a job file's table."""
    from dataclasses import fields

    from .jobfields import flag_of, table_from_options

    data = {}
    for f in fields(cls):
        dest = renamed.get(f.name, f.name)
        if hasattr(a, dest) and getattr(a, dest) is not None:
            data[f.name] = getattr(a, dest)
    return table_from_options(cls, data, "command line", option=lambda k: flag_of(cls, k))


def _kernel_table(a: argparse.Namespace):
    from .config import KernelTable

    t = _table(KernelTable, a, classes="cls")
    if getattr(a, "no_log_softmax", False):
        t.log_softmax = False
    return t


def _progress(a: argparse.Namespace) -> bool:
    return not a.quiet


def _local_kernels(a: argparse.Namespace, *options: str) -> None:
    """Replace each ``hf://`` kernel among ``options`` by its local folder, downloaded and
    verified (:func:`kernelscale.hubkernel.local_kernel`)."""
    from .hubkernel import local_kernel

    for opt in options:
        if getattr(a, opt, None):
            setattr(a, opt, str(local_kernel(getattr(a, opt), quiet=a.quiet)))


# ------------------------------------------------------------------------- commands

def cmd_simulate(a: argparse.Namespace) -> int:
    from .simulation import simulate

    t0 = time.monotonic()
    s = simulate(a.out, runs=a.runs, files=a.files, n_train=a.n_train, n_test=a.n_test,
                 classes=a.classes, seed=a.seed, progress=_progress(a))
    print(f"simulate: {s.runs} runs in {len(s.files)} file(s) to {a.out} "
          f"(train {s.n_train}, test {s.n_test}, classes {s.classes}, seed {s.seed}) in "
          f"{time.monotonic() - t0:.1f} s; labels and class names in "
          f"{Path(a.out) / 'labels.npz'}")
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    from .config import IngestTable
    from .ingestion import ingest

    job = _job(ingest=_table(IngestTable, a))
    if a.json and not a.dry_run:
        from .errors import ConfigError

        raise ConfigError("--json prints the plan of --dry-run; give both")
    if a.dry_run:
        from .ingestplan import plan_ingest

        plan = plan_ingest(job.ingest_config(show_progress=False))
        print(json.dumps(plan.as_json(), sort_keys=True) if a.json else plan.text())
        return 0
    s = ingest(job.ingest_config(show_progress=_progress(a)))
    print(s.line())
    if s.errors:
        for e in s.errors:
            print(f"kernelscale: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    from .listing import list_source
    from .sources import FetchOptions
    from .units import parse_shape

    shape = parse_shape(a.shape, "--shape") if a.shape else None
    listing = list_source(a.source, glob=a.glob, depth=a.depth, shape=shape,
                          probe=None if a.probe == "all" else _count(a.probe, "--probe"),
                          options=FetchOptions(revision=a.revision, retries=a.retries))
    print(json.dumps(listing.as_json(), sort_keys=True) if a.json else listing.table())
    return 0


def _count(text: str, flag: str) -> int:
    from .errors import ConfigError

    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"{flag} {text!r}: expected a count >= 0 or 'all'")
    return n


def cmd_kernel(a: argparse.Namespace) -> int:
    from .kernel import compute_kernel, create_output

    cfg = _job(kernel=_kernel_table(a)).kernel_config(show_progress=_progress(a))
    if a.create_only:
        out = create_output(cfg)
        print(f"kernel: output {a.out} ready, shape {out.shape} chunks "
              f"{out.chunks}")
        return 0
    print(compute_kernel(cfg).line())
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .config import EvaluateTable, KernelTable
    from .evaluation import evaluate
    from .labels import load_labels
    from .store import Store

    _local_kernels(a, "kernel", "train_kernel")
    # --json prints JSON here; the table's json is a file a job writes
    job = _job(kernel=KernelTable(store=a.store, out=a.kernel),
               evaluate=_table(EvaluateTable, a, json="-"))
    st = Store.open(job.store_path)
    labels = load_labels(job.labels_spec(), n_train=st.shape.n_train,
                         n_test=st.shape.n_test, classes=st.shape.classes)
    ev = evaluate(job.store_path, job.kernel_path, labels, **job.evaluate_options(),
                  show_progress=_progress(a))
    if a.json:
        print(json.dumps(ev.as_json(per_run=job.evaluate.per_run), sort_keys=True))
    else:
        print(ev.table())
    return 0


def cmd_curve(a: argparse.Namespace) -> int:
    import dataclasses

    from .config import CurveTable, KernelTable
    from .curve import compute_curve, curve_table

    # the curve's --out and --runs are its own; the kernel table takes the device options
    job = _job(kernel=_table(KernelTable, a, out="-", runs="-"), curve=_table(CurveTable, a))
    cfg = dataclasses.replace(job.curve_config(show_progress=_progress(a)),
                              workers=a.read_threads)
    doc = compute_curve(cfg)
    if a.json:
        print(json.dumps(doc.as_json(), sort_keys=True))
    else:
        print(curve_table(doc))
        print(f"curve: {doc.path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    import dataclasses

    from .config import KernelTable, ReportTable
    from .report import build_report

    _local_kernels(a, "kernel", "train_kernel")
    job = _job(kernel=KernelTable(store=a.store, out=a.kernel, device=a.device),
               report=_table(ReportTable, a))
    cfg = dataclasses.replace(job.report_config(show_progress=_progress(a)),
                              curve=Path(a.curve) if a.curve else None,
                              workers=a.read_threads)
    print(f"report: {build_report(cfg)}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .errors import BadInputError
    from .kernelread import describe_kernel
    from .store import Store
    from .store_info import describe_store

    p = Path(a.path)
    if not p.exists():
        raise BadInputError(f"{p}: no such store or kernel")
    if Store.exists(p):
        print(describe_store(Store.open(p)))
    else:
        print(describe_kernel(p))
    return 0


def cmd_neighbours(a: argparse.Namespace) -> int:
    from .neighbours import export_neighbours

    _local_kernels(a, "kernel")
    s = export_neighbours(a.kernel, a.k, a.out, overwrite=a.overwrite,
                          workers=a.read_threads, show_progress=_progress(a))
    print(s.line())
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare_kernels, write_comparison
    from .config import CompareTable, KernelTable
    from .labels import load_labels

    # KERNEL_B is the table's one kernel; no --out is the table's out = "" (write nothing)
    table = _table(CompareTable, argparse.Namespace(**{**vars(a), "kernels": [a.kernel_b],
                                                       "out": a.out or ""}))
    job = _job(kernel=KernelTable(out=a.kernel_a), compare=table)
    ((other, out),) = job.compare_targets()
    spec = job.compare_labels()
    cmp = compare_kernels(a.kernel_a, other, labels=load_labels(spec) if spec else None,
                          show_progress=_progress(a), **job.compare_options())
    written = write_comparison(cmp, out) if out else None
    if a.json:
        print(json.dumps(cmp.as_json(), sort_keys=True))
        return 0
    print(cmp.table())
    if written:
        print(f"compare: {written[0]}, {written[1]}")
    return 0


def cmd_publish(a: argparse.Namespace) -> int:
    from .publish import PublishConfig, print_notes, publish

    s = publish(PublishConfig(Path(a.path), a.target, revision=a.revision, message=a.message,
                              create=a.create, private=a.private, license=a.license,
                              dry_run=a.dry_run, show_progress=_progress(a)))
    print_notes(s)
    for f in s.uploaded if s.dry_run else ():
        print(f"  {f.path_in_repo}  {f.size} bytes")
    for path in s.deleted if s.dry_run else ():
        print(f"  {path}  deleted")
    print(s.line())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .integrity import repair_kernel, repair_store, verify

    rep = verify(a.path)
    for p in rep.problems:
        print(p.line())
    print(rep.line())
    if a.repair is None or not rep.problems:
        return 1 if rep.problems else 0
    if rep.kind == "store":
        if not a.repair:
            raise ConfigError("--repair needs SOURCE for a store: the folder it was ingested "
                              "from (each file is checked against the recorded sha256)")
        n = repair_store(rep.path, a.repair, rep)
        print(f"verify: rewrote {n} damaged item(s) of {rep.path} from {a.repair}")
    else:
        n = repair_kernel(rep.path, rep)
        print(f"verify: {n} tile(s) (or a top-K kernel's merged arrays) of {rep.path} marked "
              "for recomputation; run the same `kernelscale kernel` command to recompute them")
    after = verify(a.path)
    print(after.line())
    return 1 if after.problems else 0


def cmd_run(a: argparse.Namespace) -> int:
    from .bundled import job_path
    from .config import load_job
    from .pipeline import plan_run, run_job

    cfg = load_job(job_path(a.job), a.workdir, sets=a.set or ())
    plan = plan_run(cfg, a.only or ())
    if a.dry_run:
        print(plan.text(), end="")
        plan.check()
        return 0
    return run_job(cfg, plan, quiet=a.quiet, device=a.device)


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench
    from .units import parse_int_list

    if a.ingest:
        from .bench_ingest import run_ingest_bench

        run_ingest_bench(Path(a.out), n_test=a.n_test, n_train=a.n_train, runs=a.runs,
                         classes=a.classes, device=a.device,
                         skip_reference=a.skip_reference, keep=a.keep)
        return 0

    scaling = list(parse_int_list(a.scaling, "--scaling")) if a.scaling else []
    run_bench(Path(a.out), n_test=a.n_test, n_train=a.n_train, runs=a.runs,
              classes=a.classes, device=a.device, precision=a.precision, scaling=scaling,
              skip_reference=a.skip_reference, keep=a.keep)
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    from .bundled import job_path
    from .slurm import submit

    overrides = {k: getattr(a, k) for k in SLURM_OVERRIDES if getattr(a, k) is not None}
    return submit(job_path(a.job), workdir=a.workdir, dry_run=a.dry_run, overrides=overrides,
                  sets=a.set or ())


def cmd_status(a: argparse.Namespace) -> int:
    from .bundled import job_path
    from .slurm import status

    return status(job_path(a.job), workdir=a.workdir, sets=a.set or ())


def cmd_gather(a: argparse.Namespace) -> int:
    from .bundled import job_path
    from .slurm import gather

    return gather(job_path(a.job), workdir=a.workdir, evaluate=not a.no_evaluate,
                  sets=a.set or ())
