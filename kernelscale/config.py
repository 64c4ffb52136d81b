"""Job files: one validated configuration object per job; unknown keys are an error.

A job file is TOML with one table per stage it runs (``simulate``, ``ingest``, ``kernel``,
``evaluate``) and a ``[job]`` table. Relative paths inside are relative to the job's
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


@dataclass
class KernelTable:
    out: str = "kernel"
    runs: int | None = None
    pairs: str = "test-train"
    device: str = "auto"
    precision: str = "fp32"
    max_memory: str | None = None
    checkpoint_every: float = 600.0


@dataclass
class EvaluateTable:
    labels: str = "simulated/labels.npz"
    k: int = 3
    json: str | None = "results.json"


@dataclass
class JobConfig:
    path: Path
    job: JobTable = field(default_factory=JobTable)
    simulate: SimulateTable | None = None
    ingest: IngestTable | None = None
    kernel: KernelTable | None = None
    evaluate: EvaluateTable | None = None

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
          "kernel": KernelTable, "evaluate": EvaluateTable}


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
    if not any((cfg.simulate, cfg.ingest, cfg.kernel, cfg.evaluate)):
        raise ConfigError(f"{path}: names no stage (simulate, ingest, kernel, evaluate)")
    return cfg
