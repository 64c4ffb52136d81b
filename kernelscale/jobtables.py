"""The tables of a job file: one dataclass per table, every field typed, text values
parsed on load (:mod:`kernelscale.jobfields`).

``[job]`` names the job and its workdir; one table per stage it runs (:data:`STAGES`, in
the order they run); ``[slurm]`` says how ``kernelscale submit`` turns it into Slurm
jobs. The command line builds the same tables from its options, so a stage has one
schema wherever its options come from. A table with a ``validate(where)`` method is
checked as a whole once it is built (a value that depends on another of the table, a
required one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .formats import DEFAULT_KEYS, FORMATS, check_keys
from .jobfields import negated, parsed, show_colon, show_comma, show_size, show_x
from .knn import WEIGHTINGS
from .sources.hubspec import is_hub_spec, parse_hub_spec
from .units import (
    parse_bytes,
    parse_int_list,
    parse_pair,
    parse_range,
    parse_run_counts,
    parse_shape,
    parse_slurm_time,
)

#: Slurm's default MaxArraySize is 1001: array indices 0..1000.
MAX_ARRAY_TASKS = 1000
#: what a job's [publish] stage may upload
PUBLISHABLE = ("kernel", "results", "report", "workdir")


def _format(value: Any, where: str) -> str:
    """An ingest ``format``: one of :data:`kernelscale.formats.FORMATS`."""
    if value not in FORMATS:
        raise ConfigError(f"{where} {value!r}: expected one of {', '.join(FORMATS)}")
    return value


def _weighting(value: Any, where: str) -> str:
    """A k-NN ``weighting``: one of :data:`kernelscale.knn.WEIGHTINGS`."""
    if value not in WEIGHTINGS:
        raise ConfigError(f"{where} {value!r}: expected one of {', '.join(WEIGHTINGS)}")
    return value


def _keys(value: Any, where: str) -> tuple[str, str]:
    """Ingest ``keys``: ``"TEST,TRAIN"`` or a list of two names."""
    return check_keys(value, where)


@dataclass
class JobTable:
    name: str = "job"
    workdir: str = ""  #: default out/<name>, relative to the current directory
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
    #: auto (each file by its content), logpt, safetensors, npy (.npz, .npy pairs), zarr
    format: str = parsed(_format, "auto")
    #: "TEST,TRAIN": names of the two arrays (tensors, members, files, Zarr arrays)
    keys: tuple[str, str] = parsed(_keys, DEFAULT_KEYS, show=show_comma)
    skip_bad: bool = False
    max_files: int | None = None
    max_runs: int | None = None
    run_chunk: int | None = None
    #: "N_TESTxN_TRAINxCLASSES" every file must have; lets `submit` plan before the store exists
    shape: tuple[int, int, int] | None = parsed(parse_shape, show=show_x)
    workers: int | None = None  #: dask worker processes converting files (1: no dask)
    scheduler: str | None = None  #: address of a running dask scheduler to use instead
    converters: int = 2  #: threads converting files in the ingest process (every source)
    device: str = "auto"  #: where the statistics are computed: auto, cpu, cuda, cuda:N
    revision: str | None = None  #: hf:// sources: branch, tag or commit (default main)
    download_workers: int = 4  #: hf:// sources: parallel downloads
    retries: int = 5  #: hf:// sources: retries per request on transient errors
    keep_downloads: bool = False  #: hf:// sources: keep downloaded files in the cache
    cache_dir: str | None = None  #: hf:// sources: download cache (default: the Hub's)
    labels: str | None = None  #: labels to record in the store (later stages default to them)
    labels_replace: bool = False  #: replace other labels the store holds


@dataclass
class KernelTable:
    out: str = "kernel"
    store: str | None = None  #: default: the [ingest] store
    runs: int | None = None
    pairs: str = "test-train"
    device: str = "auto"
    precision: str = "fp32"
    max_memory: int | None = parsed(parse_bytes, show=show_size)  #: device bytes, e.g. "40G"
    checkpoint_every: float = 600.0
    tile: tuple[int, int] | None = parsed(parse_pair, show=show_x)  #: "ROWSxCOLS", x chunks
    chunks: tuple[int, int] | None = parsed(parse_pair, show=show_x)  #: of a new output
    rows: tuple[int, int] | None = parsed(parse_range, show=show_colon)  #: "START:STOP"
    cols: tuple[int, int] | None = parsed(parse_range, show=show_colon)  #: "START:STOP"
    runs_per_step: int | None = None  #: runs folded per GEMM step (default: planned)
    topk: int | None = None  #: keep each row's K largest values, not the full matrix
    log_softmax: bool = negated(True, "--no-log-softmax")  #: false: raw logits (ablation)
    log_softmax_fp32: bool = False  #: float32 log-softmax, as the published code
    classes: tuple[int, ...] | None = parsed(parse_int_list, show=show_comma,
                                               flag="--class")  #: only these classes
    overwrite: bool = False
    restart: bool = False


@dataclass
class EvaluateTable:
    """The k-NN evaluation of the [kernel] stage's kernel (``kernelscale evaluate``): one
    field per option of the command, ``json`` being the file a job writes."""

    labels: str | None = None  #: default: the labels recorded in the store
    k: int = 3
    weighting: str = parsed(_weighting, "none")  #: none, power (max(K,0)^p), softmax (exp(K/T))
    power: float | None = None  #: p of weighting power (default 8)
    temperature: float | None = None  #: T of weighting softmax (default 0.02)
    select: bool = False  #: choose k and the weighting without the test labels
    seed: int = 0  #: of the cross-fitting halves
    #: a train x train kernel of the same runs: select by leave-one-out (a job computes it)
    train_kernel: str | None = None
    ablations: str | None = None  #: directory of per-class / no-log-softmax kernels (computed)
    json: str | None = "results.json"  #: the results file a job writes ("" for none)
    per_run: bool = False  #: every run's accuracy in the JSON
    device: str | None = None  #: of the ablation kernels (default: the [kernel] device)
    read_threads: int | None = None  #: threads reading kernel rows (default: cores, at most 4)


def _hub_checked(value: str, where: str) -> None:
    """An hf:// spec that :func:`~kernelscale.sources.hubspec.parse_hub_spec` reads."""
    try:
        parse_hub_spec(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _kernels(value: Any, where: str) -> tuple[str, ...]:
    """[compare] ``kernels``: a kernel (a path, or ``hf://datasets/OWNER/NAME[@REV]/PATH``)
    or a list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) and x.strip()
                                                      for x in items):
        raise ConfigError(f"{where} must be a kernel path or a list of them, got {value!r}")
    for x in items:
        if is_hub_spec(x):
            _hub_checked(x, where)
    return tuple(items)


@dataclass
class CompareTable:
    """The job's kernel compared with other kernels over the same examples (``kernelscale
    compare``): one comparison per kernel."""

    #: kernels to compare with, full or top-K: a path (relative to the workdir) or
    #: hf://datasets/OWNER/NAME[@REV]/PATH, or a list of them
    kernels: tuple[str, ...] = parsed(_kernels, (), show=list)
    #: with labels, the k-NN agreement (default: the [evaluate] labels, else the store's
    #: recorded ones, else none)
    labels: str | None = None
    k: int = 10  #: of the k-NN and of the per-row neighbour overlap
    sample: int | None = None  #: rank correlation on N random rows even where exact fits
    seed: int = 0  #: of the sampled rows
    #: folder of compare.json and compare.png (several kernels: OUT/1, OUT/2, ...; "" none)
    out: str = "compare"
    read_threads: int | None = None  #: threads reading kernel rows (default: cores, at most 4)

    def validate(self, where: str) -> None:
        if not self.kernels:
            raise ConfigError(f"{where}: kernels: name the kernel(s) to compare the job's "
                              'kernel with, e.g. kernels = ["hf://datasets/OWNER/NAME/kernel"]')
        if self.k < 1:
            raise ConfigError(f"{where}: k must be >= 1, not {self.k}")
        if self.sample is not None and self.sample < 2:
            raise ConfigError(f"{where}: sample must be >= 2 rows, not {self.sample}")
        if self.read_threads is not None and self.read_threads < 1:
            raise ConfigError(f"{where}: read_threads must be >= 1")


@dataclass
class CurveTable:
    """Accuracy against the number of runs (``kernelscale curve``)."""

    labels: str | None = None  #: default: the [evaluate] labels, else the store's
    #: run counts, e.g. [10, 20, 50, "all"] or "10,20,50,all"
    runs: tuple = parsed(parse_run_counts, (10, 20, 50, 100, 200, "all"), show=show_comma)
    out: str = "curve"  #: directory of curve.json (and of the per-point kernels)
    k: int = 3
    keep_kernels: bool = False
    seed: int = 0  #: of the cross-fitting halves
    topk: int | None = None  #: each point's kernel as a top-K kernel (K >= k)


@dataclass
class ReportTable:
    """The HTML report (``kernelscale report``) of the [kernel] stage's kernel."""

    out: str = "report"  #: directory of index.html and its figures
    labels: str | None = None  #: default: the [evaluate] labels, else the store's
    train_kernel: str | None = None  #: train-train kernel for leave-one-out (computed if absent)
    ablations: str | None = None  #: directory of per-class / no-log-softmax kernels (computed)
    images: str | None = None  #: cifar10:ROOT (default: the labels when they are cifar10:)
    #: compare.json of `kernelscale compare` (or its --out folder): a comparison section
    compare: str | None = None
    k: int = 3
    weighting: str = parsed(_weighting, "none")
    power: float | None = None
    temperature: float | None = None
    threshold: float = 0.5
    examples: int = 8
    seed: int = 0


def _hub_repo(value: Any, where: str) -> str:
    """[publish] ``repo``: ``hf://datasets/OWNER/NAME[@BRANCH][/FOLDER]``."""
    if not isinstance(value, str) or not is_hub_spec(value):
        raise ConfigError(f"{where} {value!r}: expected hf://datasets/OWNER/NAME"
                          "[@BRANCH][/FOLDER]")
    _hub_checked(value, where)
    return value


def _what(value: Any, where: str) -> tuple[str, ...]:
    """[publish] ``what``: some of :data:`PUBLISHABLE` (``"kernel,report"`` or a list);
    ``workdir`` alone, as it holds the others."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"{where} must be text or a list of text, got {value!r}")
    items = tuple(dict.fromkeys(x.strip() for x in items))
    if not items or any(x not in PUBLISHABLE for x in items):
        raise ConfigError(f"{where} {value!r}: expected some of {', '.join(PUBLISHABLE)}")
    if "workdir" in items and len(items) > 1:
        raise ConfigError(f"{where} {value!r}: the workdir holds the others; name it alone")
    return items


@dataclass
class PublishTable:
    """The job's outputs uploaded to a Hub dataset repo (``kernelscale publish``), after
    every other stage."""

    #: hf://datasets/OWNER/NAME[@BRANCH][/FOLDER]: where the outputs go
    repo: str | None = parsed(_hub_repo)
    #: kernel, results, report (each keeps its name in FOLDER) or workdir (its contents);
    #: default: the kernel, results and report, those the job writes
    what: tuple[str, ...] | None = parsed(_what, show=show_comma)
    revision: str | None = None  #: the branch (default: @BRANCH of repo, else main)
    private: bool = False  #: create the repo private; refuse to publish into a public one
    create: bool = True  #: create the repo when it is missing
    message: str | None = None  #: commit message
    license: str = "other"  #: license id in the dataset card's metadata

    def validate(self, where: str) -> None:
        if not self.repo:
            raise ConfigError(f"{where}: repo: name the dataset repo to publish to, e.g. "
                              'repo = "hf://datasets/OWNER/NAME"')
        at = parse_hub_spec(self.repo).revision
        if self.revision and at and self.revision != at:
            raise ConfigError(f"{where}: revision {self.revision!r} contradicts the @{at} "
                              "of repo")
        branch = self.revision or at
        if branch and re.fullmatch(r"[0-9a-f]{40}", branch):
            raise ConfigError(f"{where}: {branch} is a commit; publishing commits to a "
                              "branch")


def _slurm_time(value: Any, where: str) -> str:
    parse_slurm_time(value, where)
    return str(value)


@dataclass
class SlurmTable:
    """How ``kernelscale submit`` turns the job into Slurm jobs (see README)."""

    partition: str | None = None  #: every job
    account: str | None = None  #: every job
    #: every job: each kernel array task, and the ingest and gather jobs unless
    #: ingest_time / gather_time say otherwise
    time: str = parsed(_slurm_time, "04:00:00")
    mem: str | None = None  #: each kernel array task, e.g. "64G"
    gres: str = "gpu:1"  #: each kernel array task ("" for none)
    cpus_per_task: int = 4  #: each kernel array task
    tasks: int | None = None  #: at most this many kernel array tasks (default: one per tile)
    max_parallel: int | None = None  #: array tasks running at once (the %M of --array)
    signal_lead: int = 120  #: seconds before the time limit that SIGUSR1 arrives
    max_requeues: int = 3  #: self-requeues per array task after that signal
    ingest_time: str | None = parsed(_slurm_time)  #: default: time
    ingest_mem: str | None = None
    ingest_cpus: int = 8  #: also the number of dask workers unless [ingest] workers
    gather_time: str | None = parsed(_slurm_time)  #: default: time
    gather_mem: str | None = None
    gather_cpus: int = 2
    gather_gres: str = ""  #: e.g. "gpu:1" when [curve]/[report] compute kernels in the gather
    extra: list | None = None  #: more sbatch options for every job, e.g. ["--qos=high"]
    setup: str = ""  #: shell lines run first in every job (module load, venv activation)
    command: str | None = None  #: how nodes run kernelscale (default: this interpreter)
    log_dir: str = "slurm"  #: scripts, plan and logs (relative to the workdir)
    templates: str | None = None  #: directory of *.sbatch.in templates (default: bundled)

    def time_of(self, stage: str) -> str:
        """The time limit of ``stage`` (ingest, kernel, gather): its own, else ``time``."""
        own = {"ingest": self.ingest_time, "gather": self.gather_time}.get(stage)
        return own or self.time

    def validate(self, where: str) -> None:
        limit = parse_slurm_time(self.time, f"{where} time")
        if not 1 <= self.signal_lead <= 65535:
            raise ConfigError(f"{where}: signal_lead must be 1..65535 seconds, not "
                              f"{self.signal_lead}")
        if limit is not None and self.signal_lead >= limit:
            raise ConfigError(f"{where}: signal_lead {self.signal_lead} s is not shorter "
                              f"than the task time limit {self.time}")
        for key in ("cpus_per_task", "ingest_cpus", "gather_cpus"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be >= 1")
        if self.tasks is not None and not 1 <= self.tasks <= MAX_ARRAY_TASKS:
            raise ConfigError(f"{where}: tasks must be 1..{MAX_ARRAY_TASKS} (Slurm's "
                              f"default MaxArraySize), not {self.tasks}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError(f"{where}: max_parallel must be >= 1")
        if self.max_requeues < 0:
            raise ConfigError(f"{where}: max_requeues must be >= 0")
        for e in self.extra or []:
            if not isinstance(e, str) or not e.startswith("-") or "\n" in e:
                raise ConfigError(f"{where}: extra must list sbatch options such as "
                                  f"\"--qos=high\", not {e!r}")


TABLES = {"job": JobTable, "simulate": SimulateTable, "ingest": IngestTable,
          "kernel": KernelTable, "evaluate": EvaluateTable, "compare": CompareTable,
          "curve": CurveTable, "report": ReportTable, "publish": PublishTable,
          "slurm": SlurmTable}
STAGES = ("simulate", "ingest", "kernel", "evaluate", "compare", "curve", "report",
          "publish")
