"""``kernelscale submit``, ``status`` and ``gather``: see :mod:`kernelscale.slurm`."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_json, read_json
from ..config import JobConfig, SlurmTable, load_job, slurm_settings
from ..errors import ConfigError, Interrupted, KernelOutputError, KernelscaleError
from ..kernel import create_output, setup_kernel
from ..output import KernelOutput
from ..plan import ArrayPlan
from ..share import compared, published
from ..signals import STOP_SIGNALS
from ..sources.base import is_local_spec
from ..store import Store
from .geometry import IngestState, ingest_state, plan_array
from .queue import (
    ACTIVE_STATES,
    FAILED_STATES,
    STAGES,
    QueueEntry,
    SlurmError,
    SlurmPaths,
    job_name,
    load_submissions,
    queue_of,
    sbatch,
    scancel,
)
from .scripts import abs_spec, array_spec, render_scripts


def _open_output(path: Path) -> KernelOutput | None:
    """The kernel group at ``path`` (full or top-K, finished or not), else None."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        return KernelOutput.open(path, mode="r")
    except KernelOutputError:
        return None


def job_output(cfg: JobConfig) -> KernelOutput | None:
    """The kernel at the job's kernel path when it is the job's, whoever computes it (a
    Slurm array or ``kernelscale run``), finished or not: of the job's [kernel] options
    over the store as it is now (its identity). None otherwise: no kernel there, no
    store yet, or a kernel of other inputs, whose done-markers count for nothing here."""
    if cfg.kernel is None or not Store.exists(cfg.store_path):
        return None
    out = _open_output(_kernel_path(cfg))
    if out is None:
        return None
    try:
        want = setup_kernel(cfg.kernel_config(show_progress=False)).identity
    except KernelscaleError:
        return None
    return out if out.attrs.get("identity") == want else None


def job_state(cfg: JobConfig) -> tuple[IngestState, KernelOutput | None]:
    """How far the job got, on Slurm or not: the ingest's state, and the job's kernel
    (:func:`job_output`; None while the ingest has files left, which change the store).

    A remote source is listed only by the ingest itself, so its ingest counts as left
    until the job's kernel of the store is finished: an ingest ran to its end before that
    kernel was computed."""
    ist = ingest_state(cfg)
    out = job_output(cfg)
    remote = cfg.ingest is not None and not is_local_spec(cfg.path_of(cfg.ingest.source))
    if (out is not None and out.attrs.get("complete") and ist.needed and remote
            and not ist.simulate):
        ist = dataclasses.replace(ist, needed=False)
    return ist, (None if ist.needed else out)


def regions_done(kp: ArrayPlan, out: KernelOutput | None) -> list[bool]:
    """For each region: do finished tiles of the output's identity cover all its chunks?
    (All do in a complete kernel, whatever tiles computed it.)"""
    if out is None or tuple(out.shape) != tuple(kp.shape):
        return [False] * len(kp.regions)
    if out.attrs.get("complete"):
        return [True] * len(kp.regions)
    grid = out.done_grid()
    return [out.tile_done(r, grid) for r in kp.regions]


def _kernel_path(cfg: JobConfig) -> Path:
    return cfg.kernel_path.resolve()


def _results_path(cfg: JobConfig) -> Path | None:
    if cfg.evaluate and cfg.evaluate.json:
        return Path(cfg.path_of(cfg.evaluate.json)).resolve()
    return None


def _gather_done(cfg: JobConfig, out: KernelOutput | None) -> bool:
    """The kernel complete and every stage after it finished. A gather killed after
    results.json (in the compare, curve, report or publish stage) is not done: submit
    queues it again."""
    if out is None or not out.attrs.get("complete"):
        return False
    res = _results_path(cfg)
    if res is not None and not res.exists():
        return False
    if cfg.curve is not None and not _curve_done(cfg):
        return False
    if cfg.compare is not None and not compared(cfg):
        return False
    # a report is published whole (renamed into place), so its report.json means done
    if cfg.report is not None and not (Path(cfg.path_of(cfg.report.out)) /
                                       "report.json").exists():
        return False
    return cfg.publish is None or published(cfg)


def _curve_done(cfg: JobConfig) -> bool:
    """Does curve.json hold every run count the job asks for? (It is rewritten after each
    point, so its mere presence says only that one point is done.)"""
    from ..curve import load_curve, run_counts
    from ..store import Store

    try:
        want = run_counts(cfg.curve.runs, Store.open(cfg.store_path).runs)
        have = {p.runs for p in load_curve(Path(cfg.path_of(cfg.curve.out)) /
                                           "curve.json").points}
    except (OSError, KernelscaleError):
        return False
    return set(want) <= have


# ------------------------------------------------------------------------- submit

def _plan_text(cfg: JobConfig, ist: IngestState, kp: ArrayPlan | None,
               todo: list[int], done: list[bool], gather: bool, commands: list[str]) -> str:
    lines = [f"job {cfg.job.name}: workdir {cfg.workdir.resolve()}"]
    if cfg.ingest is not None:
        if ist.needed:
            what = "simulate, then ingest" if ist.simulate else "ingest"
            lines.append(f"  ingest: {what} into {abs_spec(cfg, cfg.ingest.store)} "
                         f"({ist.line()}), then create the kernel output")
        else:
            lines.append(f"  ingest: done ({ist.line()})")
    if kp is not None:
        lines.append(f"  kernel: {cfg.kernel.pairs} {kp.shape[0]}x{kp.shape[1]} float32, "
                     f"chunks {kp.chunks[0]}x{kp.chunks[1]}, tile {kp.tile[0]}x{kp.tile[1]} "
                     f"(shape from the {kp.geometry_from}): {len(kp.tiles)} tile(s) in "
                     f"{len(kp.regions)} region(s), {sum(done)} done, {len(todo)} to submit")
        shown = 0
        for i, r in enumerate(kp.regions):
            if i in todo and shown < 50:
                lines.append(f"    task {i}: rows {r.r0}:{r.r1} cols {r.c0}:{r.c1} "
                             f"({len(kp.tiles_in(r))} tile(s))")
                shown += 1
        if len(todo) > shown:
            lines.append(f"    ... and {len(todo) - shown} more")
    if gather:
        res = _results_path(cfg)
        later = [n for n in ("compare", "curve", "report", "publish")
                 if getattr(cfg, n, None) is not None]
        lines.append("  gather: check every tile, mark the kernel complete"
                     + (f", evaluate -> {res}" if cfg.evaluate else "")
                     + (f", then {', '.join(later)}" if later else ""))
    lines.append("sbatch:" if commands else "sbatch: nothing to submit")
    lines += [f"  {c}" for c in commands]
    return "\n".join(lines)


def submit(job: str | Path, *, workdir: str | None = None, dry_run: bool = False,
           overrides: dict | None = None, sets: Sequence[str] = ()) -> int:
    """Submit what the job still needs (see the module docstring); 0 on success. A kernel
    finished outside Slurm (``kernelscale run``) is not computed again. ``sets``:
    ``--set`` overrides of the job file (the gather job is given them too)."""
    cfg = load_job(job, workdir, sets)
    t = slurm_settings(cfg, overrides)
    if cfg.kernel is None:
        raise ConfigError(f"{cfg.path}: `submit` needs a [kernel] table")
    paths = SlurmPaths.of(cfg, t)
    subs = load_submissions(paths)
    if not dry_run:
        _check_previous(subs)

    ist, out = job_state(cfg)
    kp = plan_array(cfg, t, ist.needed)
    if not ist.needed and not dry_run:
        # the store is final: create (or check) the output now, before any task runs
        create_output(dataclasses.replace(cfg.kernel_config(), chunks=kp.chunks))
        out = job_output(cfg)
    done = regions_done(kp, out)
    todo = [i for i, ok in enumerate(done) if not ok]
    gather = bool(todo) or ist.needed or not _gather_done(cfg, out)

    scripts = render_scripts(cfg, t, kp, paths, todo)
    stages = [s for s, on in zip(STAGES, (ist.needed, bool(todo), gather), strict=True) if on]
    commands = []
    for i, stage in enumerate(stages):
        dep = f" --dependency=afterok:<{stages[i - 1]} job>" if i else ""
        commands.append(f"sbatch --parsable{dep} {paths.script(stage)}")
    print(_plan_text(cfg, ist, kp, todo, done, gather, commands))
    if dry_run:
        for stage in stages:
            print(f"\n==> {paths.script(stage)} <==")
            print(scripts[stage], end="")
        return 0
    if not stages:
        return 0

    paths.folder.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        atomic_write_bytes(paths.script(stage), scripts[stage].encode())
    atomic_write_json(paths.plan, kp.as_json())
    submitted: dict[str, dict] = {}
    prev_id = None
    try:
        for stage in stages:
            jid = sbatch(paths.script(stage), prev_id)
            submitted[stage] = {"id": jid, "name": f"{job_name(cfg)}-{stage}",
                                "script": str(paths.script(stage))}
            if stage == "kernel":
                submitted[stage]["indices"] = todo
            prev_id = jid
    except SlurmError:
        scancel([j["id"] for j in submitted.values()])
        raise
    subs.append({"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "jobs": submitted})
    atomic_write_json(paths.submitted, {"submissions": subs})
    print("submitted: " + ", ".join(f"{s} {j['id']}" for s, j in submitted.items())
          + f"; logs in {paths.folder}")
    return 0


def _check_previous(subs: list[dict]) -> None:
    """Refuse while an earlier submission still runs; cancel jobs that never can."""
    q = queue_of(subs)
    if q is None:
        raise SlurmError("squeue: not available, cannot check earlier submissions")
    stale = [e for e in q if e.state == "PENDING" and "DependencyNeverSatisfied" in e.reason]
    if stale:
        ids = sorted({e.job_id for e in stale})
        print(f"submit: cancelling job(s) {', '.join(ids)}: their dependencies failed",
              file=sys.stderr)
        scancel(ids)
    active = [e for e in q if e.state in ACTIVE_STATES and e not in stale]
    if active:
        ids = ", ".join(f"{e.job_id} ({e.name} {e.state})" for e in active[:10])
        raise SlurmError(f"earlier submission still queued or running: {ids}; wait for it "
                         "(`kernelscale status`) or scancel it, then submit again")


# ------------------------------------------------------------------------- gather

def read_plan(cfg: JobConfig, t: SlurmTable) -> ArrayPlan:
    p = SlurmPaths.of(cfg, t).plan
    try:
        return ArrayPlan.from_json(read_json(p))
    except FileNotFoundError:
        raise SlurmError(f"{p}: no tile plan; was the job submitted "
                         "(`kernelscale submit`)?") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SlurmError(f"{p}: unreadable tile plan") from None


class _Stopped(BaseException):
    """Raised by gather's handler of a stop signal. A BaseException, as KeyboardInterrupt
    is, so that no ``except Exception`` on the way swallows it, while every ``finally``
    and cleanup still runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_raises() -> Iterator[None]:
    """Slurm ends a job at its time limit with SIGTERM (SIGKILL follows some 30 s later).
    Its default action would end gather on the spot, leaving the report's half-drawn temp
    folder; raised as an exception instead, the stage in progress removes its temps and
    the command exits 75 with one line. A kernel computed meanwhile (the curve's) handles
    the signal itself, by a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        raise _Stopped(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def gather(job: str | Path, *, workdir: str | None = None, evaluate: bool = True,
           sets: Sequence[str] = ()) -> int:
    """Check every planned tile against the done-markers, mark complete, evaluate; then
    the job's ``[compare]``, ``[curve]``, ``[report]`` and ``[publish]`` stages, when it
    has them. A stop signal
    (SIGTERM, SIGUSR1) raises :class:`~kernelscale.errors.Interrupted` after the stage in
    progress removed its temps; what earlier stages wrote is kept and the same command
    finishes the rest."""
    try:
        with _stop_raises():
            return _gather(job, workdir=workdir, evaluate=evaluate, sets=sets)
    except _Stopped as e:
        raise Interrupted(f"gather: stopped by {signal.Signals(e.signum).name}; what was "
                          "finished is kept; run the same `kernelscale gather` (or "
                          "`kernelscale submit`) again to finish") from None


def _gather(job: str | Path, *, workdir: str | None, evaluate: bool,
            sets: Sequence[str]) -> int:
    cfg = load_job(job, workdir, sets)
    t = slurm_settings(cfg)
    kp = read_plan(cfg, t)
    kpath = _kernel_path(cfg)
    out = KernelOutput.open(kpath, mode="r+")
    if tuple(out.shape) != tuple(kp.shape) or out.chunks != tuple(kp.chunks):
        raise SlurmError(f"{kpath}: shape {tuple(out.shape)} chunks {out.chunks} "
                         f"differ from the plan's {tuple(kp.shape)} {tuple(kp.chunks)}")
    try:
        out.check_markers()
    except KernelOutputError as e:
        raise SlurmError(str(e)) from None
    grid = out.done_grid()
    missing_tiles = [x for x in kp.tiles if not out.tile_done(x, grid)]
    if missing_tiles:
        regions = sorted({i for i, r in enumerate(kp.regions) for x in missing_tiles
                          if x in kp.tiles_in(r)})
        raise SlurmError(f"{kpath}: {len(missing_tiles)} of {len(kp.tiles)} tiles have no "
                         f"done-marker (regions {array_spec(regions, None)}); run "
                         "`kernelscale submit` again to compute them")
    if not out.finish_if_complete():
        raise SlurmError(f"{kpath}: the planned tiles do not cover the output")
    print(f"gather: {kpath} complete: {len(kp.tiles)} tile(s) in {len(kp.regions)} "
          "region(s) verified")
    if evaluate:
        from ..pipeline import run_after_kernel

        run_after_kernel(cfg, quiet=True)
    return 0


# ------------------------------------------------------------------------- status

_TASK_LINE = re.compile(r"^kernelscale-task: (\S+) (exit (\d+)|requeued|start)")


def _last_task_event(log: Path) -> tuple[str, int | None] | None:
    """('exit', rc) / ('requeued', None) / ('start', None) from a task log, or None."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    last = None
    for line in text.splitlines():
        m = _TASK_LINE.match(line)
        if m:
            last = ("exit", int(m.group(3))) if m.group(3) else (m.group(2), None)
    return last


def status(job: str | Path, *, workdir: str | None = None, sets: Sequence[str] = ()) -> int:
    """Print, per stage, what is done, running, failed (with its log) and left; work
    done outside Slurm (a kernel finished by ``kernelscale run``) counts as done."""
    cfg = load_job(job, workdir, sets)
    t = slurm_settings(cfg)
    paths = SlurmPaths.of(cfg, t)
    subs = load_submissions(paths)
    q = queue_of(subs)
    lines = [f"job {cfg.job.name}: workdir {cfg.workdir.resolve()}; "
             f"{len(subs)} submission(s), records in {paths.folder}"]
    if q is None:
        lines.append("  (squeue not available: running and failed jobs are not shown)")
    states: dict[str, QueueEntry] = {e.job_id: e for e in (q or [])}

    def latest(stage: str) -> dict | None:
        for s in reversed(subs):
            if stage in s["jobs"]:
                return s["jobs"][stage]
        return None

    def job_line(stage: str) -> str:
        j = latest(stage)
        if j is None:
            return ""
        e = states.get(j["id"])
        log = paths.log(stage, j["id"])
        if e is None:
            return f"; job {j['id']} (not in the queue; log {log})"
        s = f"; job {j['id']} {e.state}"
        if e.state == "PENDING" and e.reason not in ("None", ""):
            s += f" ({e.reason})"
        if e.state in FAILED_STATES:
            s += f", log {log}"
        return s

    ist, out = job_state(cfg)
    if cfg.ingest is not None:
        word = "left" if ist.needed else "done"
        lines.append(f"  ingest: {word}: {ist.line()}{job_line('ingest')}")
    try:
        kp = read_plan(cfg, t)
    except SlurmError:
        kp = None
    if cfg.kernel is not None:
        if kp is None and out is not None and out.attrs.get("complete"):
            lines.append(f"  kernel: done: {_kernel_path(cfg)} is finished (computed "
                         "outside Slurm: nothing was submitted)")
        elif kp is None:
            lines.append("  kernel: not submitted yet (no plan)")
        else:
            done = regions_done(kp, out)
            running, pending, failed = [], [], []
            for i, ok in enumerate(done):
                if ok:
                    continue
                jid = None
                for s in reversed(subs):
                    k = s["jobs"].get("kernel")
                    if k and i in k.get("indices", []):
                        jid = k["id"]
                        break
                if jid is None:
                    continue
                key = f"{jid}_{i}"
                e = states.get(key)
                log = paths.log("kernel", jid, i)
                if e is not None and e.state in ("RUNNING", "COMPLETING", "CONFIGURING"):
                    running.append(key)
                elif e is not None and e.state in ACTIVE_STATES:
                    pending.append(key)
                elif e is not None and e.state in FAILED_STATES:
                    failed.append(f"task {i} ({key} {e.state}, log {log})")
                else:
                    ev = _last_task_event(log)
                    if ev is not None and ev[0] == "exit" and ev[1] != 0:
                        failed.append(f"task {i} ({key} exit {ev[1]}, log {log})")
            n_done = sum(done)
            tiles_done = sum(len(kp.tiles_in(r)) for r, ok in zip(kp.regions, done,
                                                                   strict=True) if ok)
            left = len(done) - n_done - len(running) - len(pending) - len(failed)
            lines.append(f"  kernel: done {n_done}/{len(done)} regions ({tiles_done}/"
                         f"{len(kp.tiles)} tiles); running {len(running)}; pending "
                         f"{len(pending)}; failed {len(failed)}; left {left}")
            if running:
                lines.append(f"    running: {', '.join(running[:20])}")
            for f in failed[:20]:
                lines.append(f"    failed: {f}")
    gdone = _gather_done(cfg, out)
    res = _results_path(cfg)
    what = "done" if gdone else "left"
    extra = f" (results {res})" if gdone and res else ""
    lines.append(f"  gather: {what}{extra}{job_line('gather')}")
    print("\n".join(lines))
    return 0
