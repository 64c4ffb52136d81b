"""Job configuration: one table per stage, values parsed on load, one adapter to stages.

A job file is TOML with a ``[job]`` table, one table per stage it runs (``simulate``,
``ingest``, ``kernel``, ``evaluate``, ``curve``, ``report``) and, for ``kernelscale
submit``, a ``[slurm]`` table. Unknown tables or keys are an error naming the file and
the key. Text values that stand for numbers (``max_memory = "40G"``, ``tile =
"2048x8192"``, ``shape = "10000x50000x10"``, Slurm times) are parsed by
:mod:`kernelscale.units` when the job is loaded, so a typo fails before anything runs.

The command line builds the same tables from its options (:func:`table_from_options`),
so a stage is configured by one schema whether it comes from a job file or from flags,
and :class:`JobConfig`'s ``*_config`` methods are the one adapter from tables to the
stages' configs. ``--set TABLE.FIELD=VALUE`` overrides (:func:`parse_sets`) are values of
the job file's tables, read and checked by the same code when the job is loaded, and
:func:`job_toml` writes a loaded job back as a job file. Relative paths are relative to
the job's ``workdir`` (the current directory for the command line), except specs that
name a scheme (``hf://``, ``cifar10:``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError
from .formats import DEFAULT_KEYS, FORMATS, check_keys
from .knn import WEIGHTINGS
from .labels import is_labels_spec
from .sources.base import FetchOptions, is_local_spec
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


def _parsed(parse: Callable[[Any, str], Any], default: Any = None, *,
            show: Callable[[Any], str] = str, flag: str | None = None) -> Any:
    """A field whose text value is parsed on load by ``parse(value, where)``; ``show``
    writes a parsed value back as the option's text, ``flag`` is its command-line name
    when that is not ``--`` + the field name with ``-`` for ``_``."""
    meta: dict[str, Any] = {"parse": parse, "show": show}
    if flag:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


def _negated(default: bool, flag: str) -> Any:
    """A boolean field whose command-line option ``flag`` sets it to ``not default``."""
    return field(default=default, metadata={"flag": flag, "negated": True})


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


def _x(v: Any) -> str:
    return "x".join(map(str, v))


def _colon(v: Any) -> str:
    return ":".join(map(str, v))


def _comma(v: Any) -> str:
    return ",".join(map(str, v))


def _size(n: int) -> str:
    """Bytes as the shortest exact size text :func:`~kernelscale.units.parse_bytes`
    reads: 40000000000 -> "40G", 2**31 -> "2GiB", 12345 -> "12345"."""
    for unit, scale in (("T", 10**12), ("TiB", 2**40), ("G", 10**9), ("GiB", 2**30),
                        ("M", 10**6), ("MiB", 2**20), ("k", 10**3), ("KiB", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def flag_of(cls: type, name: str) -> str:
    """The command-line option of field ``name`` of table ``cls``."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def table_flags(table: Any, skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The command-line options that reproduce ``table`` (its fields that differ from the
    defaults, in field order) as (flag, value) pairs; ``True`` for a bare flag."""
    out: list[tuple[str, Any]] = []
    for f in fields(table):
        value = getattr(table, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = flag_of(type(table), f.name)
        if f.metadata.get("negated"):
            out.append((flag, not value))
        elif isinstance(value, bool):
            out.append((flag, value))
        elif "show" in f.metadata and value is not None:
            out.append((flag, f.metadata["show"](value)))
        elif isinstance(value, float):
            out.append((flag, f"{value:g}"))
        else:
            out.append((flag, value))
    return out


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
    format: str = _parsed(_format, "auto")
    #: "TEST,TRAIN": names of the two arrays (tensors, members, files, Zarr arrays)
    keys: tuple[str, str] = _parsed(_keys, DEFAULT_KEYS, show=_comma)
    skip_bad: bool = False
    max_files: int | None = None
    max_runs: int | None = None
    run_chunk: int | None = None
    #: "N_TESTxN_TRAINxCLASSES" every file must have; lets `submit` plan before the store exists
    shape: tuple[int, int, int] | None = _parsed(parse_shape, show=_x)
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
    max_memory: int | None = _parsed(parse_bytes, show=_size)  #: device bytes, e.g. "40G"
    checkpoint_every: float = 600.0
    tile: tuple[int, int] | None = _parsed(parse_pair, show=_x)  #: "ROWSxCOLS", x chunks
    chunks: tuple[int, int] | None = _parsed(parse_pair, show=_x)  #: of a new output
    rows: tuple[int, int] | None = _parsed(parse_range, show=_colon)  #: "START:STOP"
    cols: tuple[int, int] | None = _parsed(parse_range, show=_colon)  #: "START:STOP"
    runs_per_step: int | None = None  #: runs folded per GEMM step (default: planned)
    topk: int | None = None  #: keep each row's K largest values, not the full matrix
    log_softmax: bool = _negated(True, "--no-log-softmax")  #: false: raw logits (ablation)
    log_softmax_fp32: bool = False  #: float32 log-softmax, as the published code
    classes: tuple[int, ...] | None = _parsed(parse_int_list, show=_comma,
                                               flag="--class")  #: only these classes
    overwrite: bool = False
    restart: bool = False


@dataclass
class EvaluateTable:
    """The k-NN evaluation of the [kernel] stage's kernel (``kernelscale evaluate``): one
    field per option of the command, ``json`` being the file a job writes."""

    labels: str | None = None  #: default: the labels recorded in the store
    k: int = 3
    weighting: str = _parsed(_weighting, "none")  #: none, power (max(K,0)^p), softmax (exp(K/T))
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


@dataclass
class CurveTable:
    """Accuracy against the number of runs (``kernelscale curve``)."""

    labels: str | None = None  #: default: the [evaluate] labels, else the store's
    #: run counts, e.g. [10, 20, 50, "all"] or "10,20,50,all"
    runs: tuple = _parsed(parse_run_counts, (10, 20, 50, 100, 200, "all"), show=_comma)
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
    weighting: str = _parsed(_weighting, "none")
    power: float | None = None
    temperature: float | None = None
    threshold: float = 0.5
    examples: int = 8
    seed: int = 0


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
    time: str = _parsed(_slurm_time, "04:00:00")
    mem: str | None = None  #: each kernel array task, e.g. "64G"
    gres: str = "gpu:1"  #: each kernel array task ("" for none)
    cpus_per_task: int = 4  #: each kernel array task
    tasks: int | None = None  #: at most this many kernel array tasks (default: one per tile)
    max_parallel: int | None = None  #: array tasks running at once (the %M of --array)
    signal_lead: int = 120  #: seconds before the time limit that SIGUSR1 arrives
    max_requeues: int = 3  #: self-requeues per array task after that signal
    ingest_time: str | None = _parsed(_slurm_time)  #: default: time
    ingest_mem: str | None = None
    ingest_cpus: int = 8  #: also the number of dask workers unless [ingest] workers
    gather_time: str | None = _parsed(_slurm_time)  #: default: time
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
          "kernel": KernelTable, "evaluate": EvaluateTable,
          "curve": CurveTable, "report": ReportTable, "slurm": SlurmTable}
STAGES = ("simulate", "ingest", "kernel", "evaluate", "curve", "report")


def _check_type(label: str, value: Any, hint: Any) -> Any:
    allowed = getattr(hint, "__args__", None) or (hint,)
    allowed = tuple(getattr(a, "__origin__", a) for a in allowed if a is not type(None))
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
    raise ConfigError(f"{label} must be {names}, got {type(value).__name__} {value!r}")


def table_from_options(cls: type, data: Mapping[str, Any], where: str,
                       option: Callable[[str], str] | None = None) -> Any:
    """Build table ``cls`` from a mapping (a TOML table, or command-line options).

    Unknown keys are an error; parsed fields (sizes, shapes, ranges, times) are parsed
    here, every other value is type-checked against the field's annotation. Messages
    name a value as ``option(key)`` (the command line: ``--max-memory``), else as
    ``WHERE key 'KEY'``.
    """
    label = option or (lambda key: f"{where} {key}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join(sorted(by_name))})")
    kwargs = {}
    for key, value in data.items():
        parse = by_name[key].metadata.get("parse")
        if parse is not None and value is not None:
            kwargs[key] = parse(value, label(key))
        else:
            kwargs[key] = _check_type(label(key), value, hints[key])
    return cls(**kwargs)


@dataclass
class JobConfig:
    """A loaded job: its tables (None where the job has no such stage)."""

    path: Path | None
    job: JobTable = field(default_factory=JobTable)
    simulate: SimulateTable | None = None
    ingest: IngestTable | None = None
    kernel: KernelTable | None = None
    evaluate: EvaluateTable | None = None
    curve: CurveTable | None = None
    report: ReportTable | None = None
    slurm: SlurmTable = field(default_factory=SlurmTable)
    #: the ``--set TABLE.FIELD=VALUE`` overrides it was loaded with (a Slurm gather job
    #: loads the job file again with them)
    sets: tuple[str, ...] = ()

    @property
    def workdir(self) -> Path:
        return Path(self.job.workdir or Path("out") / self.job.name)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "command line"

    def path_of(self, p: str) -> str:
        """A path of the job relative to its workdir; scheme-qualified specs pass through."""
        if not is_local_spec(p) or is_labels_spec(p):
            return p
        q = Path(p)
        return str(q if q.is_absolute() else self.workdir / q)

    # --------------------------------------------------------- the one adapter
    @property
    def store_path(self) -> Path:
        """The store the stages read: [kernel] store, else [ingest] store, else 'store'."""
        k, i = self.kernel, self.ingest
        return Path(self.path_of((k.store if k and k.store else None)
                                 or (i.store if i else "store")))

    @property
    def kernel_path(self) -> Path:
        return Path(self.path_of(self.kernel.out if self.kernel else "kernel"))

    def labels_spec(self, own: str | None = None) -> str:
        """``own`` labels, else the [evaluate] labels, resolved against the workdir; else
        the store, whose recorded labels (``ingest --labels``) are then read."""
        spec = own or (self.evaluate.labels if self.evaluate else None)
        if not spec:
            return str(self.store_path)
        return self.path_of(spec)

    def ingest_config(self, show_progress: bool = True):
        """The :class:`~kernelscale.ingestion.IngestConfig` of the [ingest] table."""
        from .ingestion import IngestConfig

        i = self._need("ingest")
        return IngestConfig(
            source=self.path_of(i.source), store=self.path_of(i.store), glob=i.glob,
            max_files=i.max_files, max_runs=i.max_runs, skip_bad=i.skip_bad,
            run_chunk=i.run_chunk, shape=i.shape, workers=i.workers, scheduler=i.scheduler,
            converters=i.converters, device=i.device, format=i.format, keys=i.keys,
            fetch=FetchOptions(revision=i.revision, download_workers=i.download_workers,
                               retries=i.retries, keep_downloads=i.keep_downloads,
                               cache_dir=self.path_of(i.cache_dir) if i.cache_dir else None),
            labels=self.path_of(i.labels) if i.labels else None,
            labels_replace=i.labels_replace, show_progress=show_progress)

    def kernel_config(self, device: str | None = None, show_progress: bool = True,
                      **changes: Any):
        """The :class:`~kernelscale.kernel.KernelConfig` of the [kernel] table; ``changes``
        replace fields of the result (e.g. ``pairs`` for a train x train kernel)."""
        from .kernel import KernelConfig

        k = self.kernel or KernelTable()
        cfg = KernelConfig(
            store=self.store_path, out=self.kernel_path, runs=k.runs, pairs=k.pairs,
            device=device or k.device, precision=k.precision, max_memory=k.max_memory,
            tile=k.tile, chunks=k.chunks, rows=k.rows, cols=k.cols,
            checkpoint_every=k.checkpoint_every, log_softmax=k.log_softmax,
            log_softmax_fp32=k.log_softmax_fp32, classes=k.classes, overwrite=k.overwrite,
            restart=k.restart, show_progress=show_progress, runs_per_step=k.runs_per_step,
            topk=k.topk)
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def curve_config(self, device: str | None = None, show_progress: bool = True):
        from .curve import CurveConfig

        c = self._need("curve")
        k = self.kernel or KernelTable()
        return CurveConfig(
            store=self.store_path, labels=self.labels_spec(c.labels), runs=c.runs,
            out=Path(self.path_of(c.out)), k=c.k, device=device or k.device,
            precision=k.precision, max_memory=k.max_memory, keep_kernels=c.keep_kernels,
            seed=c.seed, show_progress=show_progress, topk=c.topk)

    def report_config(self, device: str | None = None, show_progress: bool = True):
        from .report import ReportConfig

        r = self._need("report")
        k = self.kernel or KernelTable()
        return ReportConfig(
            store=self.store_path, kernel=self.kernel_path,
            labels=self.labels_spec(r.labels), out=Path(self.path_of(r.out)),
            train_kernel=Path(self.path_of(r.train_kernel)) if r.train_kernel else None,
            curve=Path(self.path_of(self.curve.out)) / "curve.json" if self.curve else None,
            ablations=Path(self.path_of(r.ablations)) if r.ablations else None,
            images=self.path_of(r.images) if r.images else None,
            compare=Path(self.path_of(r.compare)) if r.compare else None, k=r.k,
            weighting=r.weighting, power=r.power, temperature=r.temperature,
            threshold=r.threshold, examples=r.examples, seed=r.seed,
            device=device or k.device, show_progress=show_progress)

    def evaluate_options(self, device: str | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`~kernelscale.evaluation.evaluate` from [evaluate]:
        every field but ``labels`` (:meth:`labels_spec`), ``json`` and ``per_run`` (what
        is written). ``device`` (``run --device``) wins over the table's and the
        [kernel] device."""
        e = self._need("evaluate")
        return {"k": e.k, "weighting": e.weighting, "power": e.power,
                "temperature": e.temperature, "select": e.select, "seed": e.seed,
                "train_kernel": self.path_of(e.train_kernel) if e.train_kernel else None,
                "ablations_dir": self.path_of(e.ablations) if e.ablations else None,
                "device": device or e.device or (self.kernel.device if self.kernel
                                                 else "auto"),
                "workers": e.read_threads}

    def _need(self, stage: str) -> Any:
        t = getattr(self, stage)
        if t is None:
            raise ConfigError(f"{self.where}: has no [{stage}] table")
        return t


def load_job(path: str | Path, workdir: str | None = None,
             sets: Sequence[str] = ()) -> JobConfig:
    """Parse and validate a job file; raises :class:`ConfigError` naming file and key.

    ``sets`` are ``--set TABLE.FIELD=VALUE`` overrides (:func:`parse_sets`): each replaces
    (or adds, with its table) that value of the file before the tables are built, so it
    is read and checked as the file's own value would be; a bad one is named as
    ``--set TABLE.FIELD``. ``workdir`` replaces ``[job] workdir`` (after the sets).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a job file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join(TABLES)})")
    overrides = parse_sets(sets)
    cfg = JobConfig(path=path, sets=tuple(sets))
    for name, cls in TABLES.items():
        if name not in raw and name not in overrides:
            continue
        where = f"{path} [{name}]"
        data = raw.get(name, {})
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a table")
        set_here = overrides.get(name, {})

        def label(key: str, name=name, where=where, set_here=set_here) -> str:
            return f"--set {name}.{key}" if key in set_here else f"{where} {key}"

        setattr(cfg, name, table_from_options(cls, {**data, **set_here}, where, label))
    slurm_sets = sorted(overrides.get("slurm", {}))
    cfg.slurm.validate(f"{path} [slurm]" + (" with --set " + ", ".join(
        f"slurm.{k}" for k in slurm_sets) if slurm_sets else ""))
    if workdir is not None:
        cfg.job = dataclasses.replace(cfg.job, workdir=workdir)
    if not any(getattr(cfg, s) for s in STAGES):
        raise ConfigError(f"{path}: names no stage ({', '.join(STAGES)})")
    return cfg


def parse_sets(sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``TABLE.FIELD=VALUE`` overrides as job-file values: {table: {field: value}}.

    VALUE is what would follow ``FIELD =`` in the job file, quotes optional for text: a
    TOML value of the field's type is taken as such (``kernel.topk=100``,
    ``evaluate.select=true``, ``slurm.extra=["--qos=high"]``), anything else as text
    (``kernel.max_memory=40G``, ``curve.runs=10,20,all``, ``ingest.source=hf://...``,
    ``job.name=2024``). A field whose text is parsed (sizes, shapes, run lists, Slurm
    times) takes the text unless VALUE is a TOML array. The table then checks and parses
    the value exactly as the file's. Malformed overrides, unknown tables and unknown
    fields raise :class:`ConfigError` naming the ``--set``.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, eq, text = item.partition("=")
        table, dot, name = key.strip().partition(".")
        if not eq or not dot or not table or not name:
            raise ConfigError(f"--set {item}: expected TABLE.FIELD=VALUE, e.g. "
                              "kernel.topk=100")
        cls = TABLES.get(table)
        if cls is None:
            raise ConfigError(f"--set {item}: no table {table!r} (tables: "
                              f"{', '.join(TABLES)})")
        by_name = {f.name: f for f in fields(cls)}
        if name not in by_name:
            raise ConfigError(f"--set {item}: [{table}] has no field {name!r} (fields: "
                              f"{', '.join(by_name)})")
        out.setdefault(table, {})[name] = _set_value(text.strip(), by_name[name],
                                                     get_type_hints(cls)[name])
    return out


def _set_value(text: str, f: dataclasses.Field, hint: Any) -> Any:
    """The job-file value that ``--set ...=TEXT`` stands for (see :func:`parse_sets`)."""
    value: Any = text
    if "\n" not in text and "\r" not in text:
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    if "parse" in f.metadata:
        return value if isinstance(value, list) else text
    allowed = getattr(hint, "__args__", None) or (hint,)
    if str in allowed and not isinstance(value, str):
        return text  # a name or path that looks like a number or a date
    return value


# ----------------------------------------------------------------- a job as TOML

def job_toml(cfg: JobConfig) -> str:
    """The loaded job as a job file that :func:`load_job` reads back into the same
    tables: every table the job has with every field, defaults included (a field that is
    not set is a comment), parsed values as their text, the workdir (and a ``[slurm]
    templates`` folder, which is relative to the job file) made absolute."""
    lines: list[str] = []
    for name in TABLES:
        table = getattr(cfg, name)
        if table is None:
            continue
        lines.append(f"[{name}]")
        for f in fields(table):
            value = getattr(table, f.name)
            if name == "job" and f.name == "workdir":
                value = str(cfg.workdir.resolve())
            elif (name == "slurm" and f.name == "templates" and value
                  and cfg.path is not None and not Path(value).is_absolute()):
                value = str((cfg.path.parent / value).resolve())
            if value is None:
                lines.append(f"# {f.name}: not set")
                continue
            if "parse" in f.metadata:
                value = f.metadata["show"](value)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 600.0, 1e-05, inf, nan: each a TOML float
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def slurm_settings(cfg: JobConfig, overrides: Mapping[str, Any] | None = None) -> SlurmTable:
    """The job's ``[slurm]`` table with command-line overrides, parsed and validated."""
    if not overrides:
        return cfg.slurm
    where = f"{cfg.where} [slurm]"
    current = {f.name: getattr(cfg.slurm, f.name) for f in fields(SlurmTable)}
    t = table_from_options(SlurmTable, {**current, **overrides}, where)
    t.validate(where)
    return t
