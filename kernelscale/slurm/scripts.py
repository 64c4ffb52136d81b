"""The sbatch scripts of a job, rendered from the templates in ``templates/``.

A template holds ``{{name}}`` placeholders; a placeholder without a value is an error.
The kernel and ingest command lines in the scripts are rendered from the same stage
configs that ``kernelscale run`` uses (:meth:`~kernelscale.config.JobConfig.kernel_config`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

from ..bundled import TEMPLATES
from ..config import JobConfig, KernelTable, SlurmTable
from ..errors import ConfigError
from ..formats import DEFAULT_KEYS
from ..jobfields import table_flags
from ..plan import ArrayPlan
from ..sources.base import is_local_spec
from .queue import SCRIPTS, SlurmPaths, job_name

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def template_dir(t: SlurmTable, cfg: JobConfig) -> Path:
    if t.templates:
        d = Path(t.templates)
        return d if d.is_absolute() or cfg.path is None else (cfg.path.parent / d)
    return TEMPLATES


def render(text: str, values: dict[str, str], name: str = "template") -> str:
    """Replace every ``{{key}}``; a placeholder without a value is an error."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ConfigError(f"{name}: unknown placeholder {{{{{key}}}}} (known: "
                              f"{', '.join(sorted(values))})")
        return values[key]

    return _PLACEHOLDER.sub(sub, text)


def _resources(t: SlurmTable, time_: str, cpus: int, mem: str | None,
               gres: str | None) -> str:
    opts = []
    if t.partition:
        opts.append(f"--partition={t.partition}")
    if t.account:
        opts.append(f"--account={t.account}")
    opts += [f"--time={time_}", f"--cpus-per-task={cpus}"]
    if mem:
        opts.append(f"--mem={mem}")
    if gres:
        opts.append(f"--gres={gres}")
    opts += list(t.extra or [])
    return "\n".join(f"#SBATCH {o}" for o in opts)


def _args(pairs: list[tuple[str, object]], sep: str = " \\\n    ") -> str:
    parts = []
    for k, v in pairs:
        if v is None or v is False:
            continue
        parts.append(k if v is True else f"{k} {shlex.quote(str(v))}")
    return sep.join(parts)


def _kernel_args(cfg: JobConfig, kp: ArrayPlan, create: bool = False) -> str:
    """The ``kernelscale kernel`` options of the job's ``[kernel]`` table, with the plan's
    tile and chunks: every option the table sets reaches the tasks. ``create``: for the
    one command that creates the output (the only one that may replace an old one);
    array tasks never pass --overwrite or --restart, which would delete each other's
    tiles."""
    kc = cfg.kernel_config()
    table = dataclasses.replace(cfg.kernel or KernelTable(), tile=kp.tile, chunks=kp.chunks)
    skip = ("store", "out", "rows", "cols") + (() if create else ("overwrite", "restart"))
    return _args([("--store", Path(kc.store).resolve()), ("--out", Path(kc.out).resolve()),
                  *table_flags(table, skip)])


def abs_spec(cfg: JobConfig, p: str) -> str:
    r = cfg.path_of(p)
    return str(Path(r).resolve()) if is_local_spec(r) else r


def _ingest_args(cfg: JobConfig) -> str:
    i = cfg.ingest
    pairs = [("--store", abs_spec(cfg, i.store)),
             ("--glob", i.glob if i.glob != "**/log.pt" else None),
             ("--max-files", i.max_files), ("--max-runs", i.max_runs),
             ("--run-chunk", i.run_chunk), ("--skip-bad", i.skip_bad),
             ("--shape", "x".join(map(str, i.shape)) if i.shape else None),
             ("--format", i.format if i.format != "auto" else None),
             ("--keys", ",".join(i.keys) if tuple(i.keys) != DEFAULT_KEYS else None),
             ("--labels", abs_spec(cfg, i.labels) if i.labels else None),
             ("--labels-replace", i.labels_replace)]
    remote = not is_local_spec(i.source)
    if remote:
        pairs += [("--revision", i.revision), ("--download-workers", i.download_workers),
                  ("--retries", i.retries), ("--keep-downloads", i.keep_downloads),
                  ("--cache-dir", abs_spec(cfg, i.cache_dir) if i.cache_dir else None)]
    elif i.scheduler:
        pairs.append(("--scheduler", i.scheduler))
    elif i.workers is not None:
        pairs.append(("--workers", i.workers))
    text = f"{shlex.quote(abs_spec(cfg, i.source))} {_args(pairs, ' ')}"
    if not remote and not i.scheduler and i.workers is None:
        # one dask worker process per CPU of the job
        text += ' --workers "${SLURM_CPUS_PER_TASK:-1}"'
    return text


def _simulate_block(cfg: JobConfig, cmd: str) -> str:
    if not cfg.simulate:
        return ""
    s = cfg.simulate
    out = abs_spec(cfg, s.out)
    args = _args([("--runs", s.runs), ("--files", s.files), ("--n-train", s.n_train),
                  ("--n-test", s.n_test), ("--classes", s.classes), ("--seed", s.seed)], " ")
    return ("# The simulated source ([simulate] table), unless a complete one is there.\n"
            f"[ -e {shlex.quote(out + '/labels.npz')} ] || "
            f"{cmd} simulate --out {shlex.quote(out)} {args}\n")


def _command(t: SlurmTable) -> str:
    return t.command or f"{shlex.quote(sys.executable)} -m kernelscale"


def _setup(t: SlurmTable) -> str:
    if not t.setup.strip():
        return ""
    return "# Site set-up ([slurm] setup).\n" + t.setup.rstrip("\n") + "\n"


def render_scripts(cfg: JobConfig, t: SlurmTable, kp: ArrayPlan | None, paths: SlurmPaths,
                   todo: list[int] | None = None) -> dict[str, str]:
    """The sbatch scripts of the job's stages; the array asks for the regions ``todo``."""
    tdir = template_dir(t, cfg)
    cmd = _command(t)
    name = job_name(cfg)
    common = {"job_name": name, "job_file": str(cfg.path.resolve()),
              "setup": _setup(t), "kernelscale": cmd}
    out = {}

    def load(stage: str) -> str:
        p = tdir / f"{SCRIPTS[stage]}.in"
        try:
            return p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the sbatch template ({e.strerror})") from None

    if cfg.ingest is not None and kp is not None:
        out["ingest"] = render(load("ingest"), {
            **common, "output": paths.output("ingest"),
            "simulate": _simulate_block(cfg, cmd), "ingest_args": _ingest_args(cfg),
            "kernel_args": _kernel_args(cfg, kp, create=True).replace(" \\\n    ", " "),
            "resources": _resources(t, t.time_of("ingest"), t.ingest_cpus, t.ingest_mem,
                                    None)},
            f"{SCRIPTS['ingest']}.in")
    if kp is not None:
        regions = "\n".join(f'    "{r.r0}:{r.r1} {r.c0}:{r.c1}"  # {i}'
                            for i, r in enumerate(kp.regions))
        out["kernel"] = render(load("kernel"), {
            **common, "output": paths.output("kernel"), "regions": regions,
            "kernel_args": _kernel_args(cfg, kp),
            "array": array_spec(list(range(len(kp.regions))) if todo is None else todo,
                                t.max_parallel),
            "signal_lead": str(t.signal_lead), "max_requeues": str(t.max_requeues),
            "resources": _resources(t, t.time_of("kernel"), t.cpus_per_task, t.mem,
                                    t.gres or None)},
            f"{SCRIPTS['kernel']}.in")
    # the gather job loads the job file again: with the --set overrides submit was given
    gather_args = " ".join([shlex.quote(str(cfg.path.resolve())), "--workdir",
                            shlex.quote(str(cfg.workdir.resolve())),
                            *(f"--set {shlex.quote(s)}" for s in cfg.sets)])
    out["gather"] = render(load("gather"), {
        **common, "output": paths.output("gather"), "gather_args": gather_args,
        "resources": _resources(t, t.time_of("gather"), t.gather_cpus, t.gather_mem,
                                t.gather_gres or None)},
        f"{SCRIPTS['gather']}.in")
    return out


def array_spec(indices: list[int], max_parallel: int | None) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (plus '%M')."""
    parts = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    spec = ",".join(parts)
    return spec + (f"%{max_parallel}" if max_parallel else "")
