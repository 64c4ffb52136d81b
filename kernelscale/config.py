"""Job files: one validated configuration object per job; unknown keys are an error.

A job file is TOML with one table per stage it runs (``simulate``, ``ingest``, ``kernel``,
``evaluate``, ``curve``, ``report``), a ``[job]`` table and, for ``kernelscale submit``, a ``[slurm]`` table.
Relative paths inside are relative to the job's
``workdir`` (itself relative to the current directory unless absolute), except a
``source``/``labels`` that names a scheme (``hf://``, ``cifar10:``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError


@dataclass
class JobTable:
    name: str = "job"
    workdir: str = ""
    description: str = ""


@dataclass
class SimulateTable:
    out: str = "simulated"
    runs: int = 200
    files: int = 2
    n_train: int = 2000
    n_test: int = 500
    classes: int = 10
    seed: int = 0


@dataclass
class IngestTable:
    source: str = "simulated"
    store: str = "store"
    glob: str = "**/log.pt"
    skip_bad: bool = False
    max_files: int | None = None
    max_runs: int | None = None
    run_chunk: int | None = None
    #: "N_TESTxN_TRAINxCLASSES" every file must have; lets `submit` plan before the store exists
    shape: str | None = None
    workers: int | None = None  #: dask worker processes validating files (1: no dask)
    scheduler: str | None = None  #: address of a running dask scheduler to use instead
    revision: str | None = None  #: hf:// sources: branch, tag or commit (default main)
    download_workers: int = 4  #: hf:// sources: parallel downloads
    retries: int = 5  #: hf:// sources: retries per request on transient errors
    keep_downloads: bool = False  #: hf:// sources: keep downloaded files in the cache
    cache_dir: str | None = None  #: hf:// sources: download cache (default: the Hub's)


@dataclass
class KernelTable:
    out: str = "kernel"
    runs: int | None = None
    pairs: str = "test-train"
    device: str = "auto"
    precision: str = "fp32"
    max_memory: str | None = None
    checkpoint_every: float = 600.0
    tile: str | None = None  #: "ROWSxCOLS", multiples of the chunks
    chunks: str | None = None  #: "ROWSxCOLS" output chunk shape (new kernels only)
    run_chunk: int | None = None  #: runs folded per step (default: from the store's chunks)
    log_softmax_fp32: bool = False  #: float32 log-softmax, as the published code


@dataclass
class EvaluateTable:
    labels: str = "simulated/labels.npz"
    k: int = 3
    json: str | None = "results.json"


@dataclass
class CurveTable:
    """Accuracy against the number of runs (``kernelscale curve``)."""

    labels: str | None = None  #: default: the [evaluate] labels
    runs: list = field(default_factory=lambda: [10, 20, 50, 100, 200, "all"])  #: run counts
    out: str = "curve"  #: directory of curve.json (and of the per-point kernels)
    k: int = 3
    keep_kernels: bool = False
    seed: int = 0  #: of the cross-fitting halves


@dataclass
class ReportTable:
    """The HTML report (``kernelscale report``) of the [kernel] stage's kernel."""

    out: str = "report"  #: directory of index.html and its figures
    labels: str | None = None  #: default: the [evaluate] labels
    train_kernel: str | None = None  #: train-train kernel for leave-one-out (computed if absent)
    ablations: str | None = None  #: directory of per-class / no-log-softmax kernels (computed)
    images: str | None = None  #: cifar10:ROOT (default: the labels when they are cifar10:)
    k: int = 3
    weighting: str = "none"
    power: float | None = None
    temperature: float | None = None
    threshold: float = 0.5
    examples: int = 8
    seed: int = 0


@dataclass
class SlurmTable:
    """How ``kernelscale submit`` turns the job into Slurm jobs (see README)."""

    partition: str | None = None  #: every job
    account: str | None = None  #: every job
    time: str = "04:00:00"  #: each kernel array task
    mem: str | None = None  #: each kernel array task, e.g. "64G"
    gres: str = "gpu:1"  #: each kernel array task ("" for none)
    cpus_per_task: int = 4  #: each kernel array task
    tasks: int | None = None  #: at most this many kernel array tasks (default: one per tile)
    max_parallel: int | None = None  #: array tasks running at once (the %M of --array)
    signal_lead: int = 120  #: seconds before the time limit that SIGUSR1 arrives
    max_requeues: int = 3  #: self-requeues per array task after that signal
    ingest_time: str = "04:00:00"
    ingest_mem: str | None = None
    ingest_cpus: int = 8  #: also the number of dask workers unless [ingest] workers
    gather_time: str = "01:00:00"
    gather_mem: str | None = None
    gather_cpus: int = 2
    gather_gres: str = ""  #: e.g. "gpu:1" when [curve]/[report] compute kernels in the gather
    extra: list | None = None  #: more sbatch options for every job, e.g. ["--qos=high"]
    setup: str = ""  #: shell lines run first in every job (module load, venv activation)
    command: str | None = None  #: how nodes run kernelscale (default: this interpreter)
    log_dir: str = "slurm"  #: scripts, plan and logs (relative to the workdir)
    templates: str | None = None  #: directory of *.sbatch.in templates (default: slurm/)


@dataclass
class JobConfig:
    path: Path
    job: JobTable = field(default_factory=JobTable)
    simulate: SimulateTable | None = None
    ingest: IngestTable | None = None
    kernel: KernelTable | None = None
    evaluate: EvaluateTable | None = None
    curve: CurveTable | None = None
    report: ReportTable | None = None
    slurm: SlurmTable = field(default_factory=SlurmTable)

    @property
    def workdir(self) -> Path:
        return Path(self.job.workdir or Path("out") / self.job.name)

    def resolve(self, p: str) -> str:
        """A path of the job relative to its workdir; scheme-qualified specs pass through."""
        if "://" in p or p.startswith("cifar10:"):
            return p
        q = Path(p)
        return str(q if q.is_absolute() else self.workdir / q)


TABLES = {"job": JobTable, "simulate": SimulateTable, "ingest": IngestTable,
          "kernel": KernelTable, "evaluate": EvaluateTable,
          "curve": CurveTable, "report": ReportTable, "slurm": SlurmTable}


def _check_type(where: str, key: str, value: Any, hint: Any) -> Any:
    allowed = getattr(hint, "__args__", None) or (hint,)
    allowed = tuple(a for a in allowed if a is not type(None))
    if value is None:
        return value
    for a in allowed:
        if a is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if a is int and isinstance(value, bool):
            continue
        if isinstance(value, a):
            return value
    names = " or ".join(a.__name__ for a in allowed)
    raise ConfigError(f"{where}: key {key!r} must be {names}, got {type(value).__name__} "
                      f"{value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join(sorted(names))})")
    kwargs = {k: _check_type(where, k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def load_job(path: str | Path, workdir: str | None = None) -> JobConfig:
    """Parse and validate a job file; raises :class:`ConfigError` naming file and key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join(TABLES)})")
    cfg = JobConfig(path=path)
    for name, cls in TABLES.items():
        if name in raw:
            setattr(cfg, name, _build(cls, raw[name], f"{path} [{name}]"))
    if workdir is not None:
        cfg.job = dataclasses.replace(cfg.job, workdir=workdir)
    if not any((cfg.simulate, cfg.ingest, cfg.kernel, cfg.evaluate, cfg.curve, cfg.report)):
        raise ConfigError(f"{path}: names no stage (simulate, ingest, kernel, evaluate, curve, "
                          "report)")
    return cfg
