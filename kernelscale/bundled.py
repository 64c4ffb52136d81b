"""The job files and sbatch templates that ship inside the package.

``kernelscale run`` with no job runs the bundled demo, and a job named by its bare name
or as ``jobs/NAME.toml`` where no such file exists (outside a checkout) is the bundled job
of that name, so an installed wheel works from any directory. A foundation module: it imports
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

    ``None`` is the bundled demo job; an existing file is itself; otherwise, for a bare
    name (``demo-slurm``, ``demo-slurm.toml``) or ``jobs/NAME.toml``, the bundled job of
    that name (a line on stderr says so). Anything else raises :class:`ConfigError`.
    """
    if arg is None:
        return BUNDLED_JOBS / f"{DEFAULT_JOB}.toml"
    p = Path(arg)
    if p.is_file():
        return p
    # only a bare name or the repository's own spelling, jobs/NAME.toml: a missing file
    # anywhere else is a typo, and running the demo in its place would hide it
    parts = p.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "jobs" and p.suffix == ".toml"):
        stem = p.name.removesuffix(".toml")
        bundled = BUNDLED_JOBS / f"{stem}.toml"
        if stem and stem not in (".", "..") and bundled.is_file():
            print(f"kernelscale: using the bundled job {bundled}", file=sys.stderr)
            return bundled
    names = ", ".join(bundled_jobs()) or "none"
    raise ConfigError(f"{arg}: no such job file (bundled jobs: {names})")
