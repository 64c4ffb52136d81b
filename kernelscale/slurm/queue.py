"""Every on-disk name of a submission, and the calls to ``sbatch``, ``squeue``, ``scancel``.

:class:`SlurmPaths` is the one place that names the files under ``WORKDIR/<log_dir>``:
the scripts, ``plan.json`` (the tiles and regions, read by ``gather``),
``submitted.json`` (the job ids of every submission, read by ``status`` and by the next
``submit``) and the jobs' logs (the ``--output`` patterns of the scripts and the files
Slurm makes of them).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..atomic import read_json
from ..config import JobConfig, SlurmTable
from ..errors import KernelscaleError

#: squeue states of a job that still runs or may run.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                 "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
                 "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
STAGES = ("ingest", "kernel", "gather")
#: the template and the script of each stage
SCRIPTS = {"ingest": "ingest.sbatch", "kernel": "kernel-array.sbatch",
           "gather": "gather.sbatch"}
#: Slurm --output patterns; %j: job id, %A_%a: array job id and task index
_OUTPUT = {"ingest": "ingest-%j.out", "kernel": "kernel-%A_%a.out", "gather": "gather-%j.out"}


class SlurmError(KernelscaleError):
    """Submitting to Slurm failed, or a submitted job's state is inconsistent."""


@dataclass(frozen=True)
class SlurmPaths:
    """The files of one job's submissions, all under ``folder``."""

    folder: Path

    @classmethod
    def of(cls, cfg: JobConfig, t: SlurmTable) -> SlurmPaths:
        d = Path(t.log_dir)
        return cls((d if d.is_absolute() else cfg.workdir / d).resolve())

    def script(self, stage: str) -> Path:
        return self.folder / SCRIPTS[stage]

    @property
    def plan(self) -> Path:
        return self.folder / "plan.json"

    @property
    def submitted(self) -> Path:
        return self.folder / "submitted.json"

    def output(self, stage: str) -> str:
        """The ``#SBATCH --output`` pattern of a stage's script."""
        return str(self.folder / _OUTPUT[stage])

    def log(self, stage: str, job_id: str, task: int | None = None) -> Path:
        """The log Slurm writes for job ``job_id`` (array task ``task``) of ``stage``."""
        name = _OUTPUT[stage].replace("%j", job_id).replace("%A", job_id)
        return self.folder / name.replace("%a", str(task))


def job_name(cfg: JobConfig) -> str:
    """The job's name made safe for Slurm's --job-name and squeue's --name lists."""
    import re

    return re.sub(r"[^\w.-]", "_", cfg.job.name) or "job"


def load_submissions(paths: SlurmPaths) -> list[dict]:
    p = paths.submitted
    if not p.exists():
        return []
    try:
        return list(read_json(p)["submissions"])
    except (OSError, ValueError, KeyError):
        raise SlurmError(f"{p}: unreadable submission record") from None


def jobs_of(subs: list[dict]) -> list[tuple[str, str, str]]:
    """(stage, job id, name) of every job of every submission."""
    return [(stage, j["id"], j["name"]) for s in subs for stage, j in s["jobs"].items()]


@dataclass
class QueueEntry:
    job_id: str  #: "12" or "12_3" for an array task
    name: str
    state: str
    reason: str

    @property
    def base(self) -> str:
        return self.job_id.split("_")[0]


def squeue(names: list[str]) -> list[QueueEntry] | None:
    """Every job (one line per array task) of these names in any state, None if no squeue."""
    if shutil.which("squeue") is None:
        return None
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "--name", ",".join(names),
                            "-o", "%i|%j|%T|%r"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    out = []
    for line in p.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            out.append(QueueEntry(*parts))
    return out


def queue_of(subs: list[dict]) -> list[QueueEntry] | None:
    """squeue's view of the recorded jobs (ids are matched with names: ids restart)."""
    jobs = jobs_of(subs)
    if not jobs:
        return []
    q = squeue(sorted({n for _, _, n in jobs}))
    if q is None:
        return None
    ours = {(i, n) for _, i, n in jobs}
    return [e for e in q if (e.base, e.name) in ours]


def sbatch(script: Path, dependency: str | None) -> str:
    """Submit ``script`` (after ``dependency`` succeeded); return the job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    cmd.append(str(script))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch: not found (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{script}: sbatch did not answer within 120 s") from None
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise SlurmError(f"{script}: sbatch failed: {msg[-1] if msg else p.returncode}")
    return p.stdout.strip().split(";")[0]


def scancel(ids: list[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
