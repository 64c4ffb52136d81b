"""Job configuration: a job file loaded into its tables, and the one adapter from tables
to the stages' configs.

A job file is TOML with a ``[job]`` table, one table per stage it runs (``simulate``,
``ingest``, ``kernel``, ``evaluate``, ``compare``, ``curve``, ``report``, ``publish``) and,
for ``kernelscale submit``, a ``[slurm]`` table (:mod:`kernelscale.jobtables`). Unknown
tables or keys are an error naming the file and the key. Text values that stand for
numbers (``max_memory = "40G"``, ``tile = "2048x8192"``, ``shape = "10000x50000x10"``,
Slurm times) are parsed by :mod:`kernelscale.units` when the job is loaded, so a typo
fails before anything runs.

The command line builds the same tables from its options
(:func:`~kernelscale.jobfields.table_from_options`), so a stage is configured by one
schema whether it comes from a job file or from flags, and :class:`JobConfig`'s
``*_config`` and ``*_options`` methods are the one adapter from tables to the stages'
configs. ``--set TABLE.FIELD=VALUE`` overrides (:func:`parse_sets`) are values of the job
file's tables, read and checked by the same code when the job is loaded, and
:func:`job_toml` writes a loaded job back as a job file. Relative paths are relative to
the job's ``workdir`` (the current directory for the command line), except specs that
name a scheme (``hf://``, ``cifar10:``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError
from .jobfields import table_from_options
from .jobtables import (
    STAGES,
    TABLES,
    CompareTable,
    CurveTable,
    EvaluateTable,
    IngestTable,
    JobTable,
    KernelTable,
    PublishTable,
    ReportTable,
    SimulateTable,
    SlurmTable,
)
from .labels import is_labels_spec
from .sources.base import FetchOptions, is_local_spec
from .sources.hubspec import is_hub_spec


@dataclass
class JobConfig:
    """A loaded job: its tables (None where the job has no such stage)."""

    path: Path | None
    job: JobTable = field(default_factory=JobTable)
    simulate: SimulateTable | None = None
    ingest: IngestTable | None = None
    kernel: KernelTable | None = None
    evaluate: EvaluateTable | None = None
    compare: CompareTable | None = None
    curve: CurveTable | None = None
    report: ReportTable | None = None
    publish: PublishTable | None = None
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
            train_kernel=self.kernel_at(r.train_kernel),
            curve=Path(self.path_of(self.curve.out)) / "curve.json" if self.curve else None,
            ablations=Path(self.path_of(r.ablations)) if r.ablations else None,
            images=self.path_of(r.images) if r.images else None,
            compare=self.comparison(), k=r.k,
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

    def kernel_at(self, p: str | None) -> Path | str | None:
        """A kernel the job reads: a local one as a Path relative to the workdir, an
        ``hf://`` one as its spec (:func:`kernelscale.hubkernel.local_kernel` fetches it)."""
        if not p:
            return None
        q = self.path_of(p)
        return q if is_hub_spec(q) else Path(q)

    def compare_targets(self) -> list[tuple[str, Path | None]]:
        """(kernel, output folder) of each [compare] kernel, in order: local kernels
        relative to the workdir, ``hf://`` ones as they are; the folder is ``out`` for one
        kernel, ``out/1``, ``out/2``, ... for several, None when ``out`` is ""."""
        c = self._need("compare")
        out = Path(self.path_of(c.out)) if c.out else None
        many = len(c.kernels) > 1
        return [(self.path_of(spec), out / str(i) if out and many else out)
                for i, spec in enumerate(c.kernels, 1)]

    def comparison(self) -> Path | None:
        """The comparison the report shows: [report] ``compare``, else the
        ``compare.json`` of the first [compare] kernel; None when there is neither."""
        if self.report is not None and self.report.compare:
            return Path(self.path_of(self.report.compare))
        if self.compare is None:
            return None
        out = self.compare_targets()[0][1]
        return out / "compare.json" if out else None

    def compare_labels(self) -> str | None:
        """The [compare] labels, else the [evaluate] ones, resolved against the workdir;
        None when neither names labels (the stage then takes the store's, if recorded)."""
        spec = self._need("compare").labels or (self.evaluate.labels if self.evaluate
                                                 else None)
        return self.path_of(spec) if spec else None

    def compare_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~kernelscale.compare.compare_kernels` from
        [compare]: every field but ``kernels`` and ``out`` (:meth:`compare_targets`) and
        ``labels`` (:meth:`compare_labels`)."""
        c = self._need("compare")
        return {"k": c.k, "sample": c.sample, "seed": c.seed, "workers": c.read_threads}

    def publish_items(self) -> list[tuple[str, Path]]:
        """(what, local path) of each output the [publish] stage uploads, in order: those
        of ``what``, else the kernel, results and report, those the job writes. A
        :class:`ConfigError` names one ``what`` asks for that the job does not write."""
        p = self._need("publish")
        have = {"kernel": self.kernel_path, "workdir": self.workdir}
        if self.evaluate is not None and self.evaluate.json:
            have["results"] = Path(self.path_of(self.evaluate.json))
        if self.report is not None:
            have["report"] = Path(self.path_of(self.report.out))
        if p.what is None:
            return [(w, have[w]) for w in ("kernel", "results", "report") if w in have]
        for w in p.what:
            if w not in have:
                why = ("no [evaluate] table with a json file" if w == "results"
                       else "no [report] table")
                raise ConfigError(f"{self.where} [publish] what {w!r}: the job writes no "
                                  f"{w} ({why})")
        return [(w, have[w]) for w in p.what]

    def publish_configs(self, show_progress: bool = True):
        """The :class:`~kernelscale.publish.PublishConfig` of each output of
        :meth:`publish_items`, all to the [publish] repo."""
        from .publish import PublishConfig

        p = self._need("publish")
        return [PublishConfig(path, p.repo, revision=p.revision, message=p.message,
                              create=p.create, private=p.private, license=p.license,
                              show_progress=show_progress)
                for _, path in self.publish_items()]

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

        table = table_from_options(cls, {**data, **set_here}, where, label)
        if hasattr(table, "validate"):
            table.validate(where + (" with --set " + ", ".join(
                f"{name}.{k}" for k in sorted(set_here)) if set_here else ""))
        setattr(cfg, name, table)
    if workdir is not None:
        cfg.job = dataclasses.replace(cfg.job, workdir=workdir)
    if not any(getattr(cfg, s) for s in STAGES):
        raise ConfigError(f"{path}: names no stage ({', '.join(STAGES)})")
    if cfg.publish is not None:
        cfg.publish_items()  # a `what` the job does not write fails now
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
