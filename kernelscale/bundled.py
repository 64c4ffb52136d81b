"""The job files and sbatch templates that ship inside the package.

``kernelscale run`` with no job runs the bundled demo, and a job named by a path that does
not exist (``jobs/demo-slurm.toml`` outside a checkout) falls back to the bundled job of
that name, so an installed wheel works from any directory. A foundation module: it imports
nothing from kernelscale but :mod:`kernelscale.errors`.
"""

import sys
from pathlib import Path

from .errors import ConfigError

#: the bundled job files, ``<name>.toml``
BUNDLED_JOBS = Path(__file__).resolve().parent / "jobs"
#: the bundled ``*.sbatch.in`` templates of ``kernelscale submit``
TEMPLATES = Path(__file__).resolve().parent / "slurm" / "templates"

DEFAULT_JOB = "demo"


def bundled_jobs() -> list[str]:
    """Names of the bundled jobs (file names without ``.toml``), sorted."""
    if not BUNDLED_JOBS.is_dir():
        return []
    return sorted(p.stem for p in BUNDLED_JOBS.glob("*.toml") if p.is_file())


def job_path(arg: str | None) -> Path:
    """The job file that a command-line argument names.

    ``None`` is the bundled demo job; an existing file is itself; otherwise a bundled job
    whose name is the argument's file name, with or without ``.toml`` (a line on stderr
    says so). Anything else raises :class:`ConfigError`.
    """
    if arg is None:
        return BUNDLED_JOBS / f"{DEFAULT_JOB}.toml"
    p = Path(arg)
    if p.is_file():
        return p
    name = p.name
    if name and name not in (".", ".."):
        stem = name.removesuffix(".toml")
        bundled = BUNDLED_JOBS / f"{stem}.toml"
        if stem and bundled.is_file():
            print(f"kernelscale: using the bundled job {bundled}", file=sys.stderr)
            return bundled
    names = ", ".join(bundled_jobs()) or "none"
    raise ConfigError(f"{arg}: no such job file (bundled jobs: {names})")
