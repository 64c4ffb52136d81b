"""Run a job on a Slurm cluster: an ingest job, a kernel job array, a gather job.

``kernelscale submit JOB.toml`` turns the job file into up to three Slurm jobs chained
with ``--dependency=afterok``:

1. **ingest** (CPU): simulate if the job says so, ingest the source files on dask
   workers, then create the kernel's output array (``kernel --prepare-only``) so the
   array tasks never race to create it. Left out when the store already holds every
   source file.
2. **kernel** (GPU): a job array with one task per *region* of the output: a rectangle of
   tiles of the tile plan, on the output's chunk grid, so no two tasks write one chunk.
   Task ``i`` runs ``kernelscale kernel --rows a:b --cols c:d`` for region ``i`` with the
   plan's tile shape, which makes its tiles the very tiles a single-process run with that
   ``--tile`` computes (same operations, same bits on the same device). Only the regions
   not yet finished are submitted.
3. **gather** (CPU): ``kernelscale gather``: checks every tile of the plan against the
   done-markers, marks the kernel complete and evaluates it.

The sbatch scripts are rendered from the templates in ``slurm/`` (``{{name}}``
placeholders). Everything ``submit`` decides is written under ``WORKDIR/<log_dir>``:
the scripts, ``plan.json`` (the tiles and regions, read by ``gather``), ``submitted.json``
(the job ids of every submission, read by ``status`` and by the next ``submit``) and the
jobs' logs.

Nothing here needs Slurm except :func:`submit` (``sbatch``, ``squeue``, ``scancel``) and
the running part of :func:`status` (``squeue``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_bytes, atomic_write_json, read_json
from .config import JobConfig, SlurmTable, load_job
from .errors import ConfigError, KernelOutputError, KernelscaleError
from .plan import Tile, plan

#: Tile budget (device bytes) for planning when the job sets neither ``[kernel] tile`` nor
#: ``max_memory``: the submitting host cannot see the GPUs, and 8 GiB fits any current
#: datacenter GPU with room for the framework.
DEFAULT_TASK_BUDGET = 8 << 30
#: Slurm's default MaxArraySize is 1001: array indices 0..1000.
MAX_ARRAY_TASKS = 1000
#: squeue states of a job that still runs or may run.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                 "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
                 "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
TEMPLATES = {"ingest": "ingest.sbatch.in", "kernel": "kernel-array.sbatch.in",
             "gather": "gather.sbatch.in"}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmError(KernelscaleError):
    """Submitting to Slurm failed, or a submitted job's state is inconsistent."""


# ------------------------------------------------------------------------- settings

def slurm_seconds(text: str) -> int | None:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds; None: no limit."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"time {text!r}: expected a Slurm time such as 04:00:00 or 1-12:00")
    d, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is None:  # M | M:S | H:M:S
        h, mi, s = (0, a, b or 0) if c is None else (a, b, c)
    else:  # D-H | D-H:M | D-H:M:S
        h, mi, s = a, b or 0, c or 0
    return (((d or 0) * 24 + h) * 60 + mi) * 60 + s


def slurm_settings(cfg: JobConfig, overrides: dict | None = None) -> SlurmTable:
    """The job's ``[slurm]`` table with command-line overrides, validated."""
    t = dataclasses.replace(cfg.slurm, **(overrides or {}))
    where = f"{cfg.path} [slurm]"
    for key in ("time", "ingest_time", "gather_time"):
        slurm_seconds(getattr(t, key))
    limit = slurm_seconds(t.time)
    if not 1 <= t.signal_lead <= 65535:
        raise ConfigError(f"{where}: signal_lead must be 1..65535 seconds, not {t.signal_lead}")
    if limit is not None and t.signal_lead >= limit:
        raise ConfigError(f"{where}: signal_lead {t.signal_lead} s is not shorter than the "
                          f"task time limit {t.time}")
    for key in ("cpus_per_task", "ingest_cpus", "gather_cpus"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{where}: {key} must be >= 1")
    if t.tasks is not None and not 1 <= t.tasks <= MAX_ARRAY_TASKS:
        raise ConfigError(f"{where}: tasks must be 1..{MAX_ARRAY_TASKS} (Slurm's default "
                          f"MaxArraySize), not {t.tasks}")
    if t.max_parallel is not None and t.max_parallel < 1:
        raise ConfigError(f"{where}: max_parallel must be >= 1")
    if t.max_requeues < 0:
        raise ConfigError(f"{where}: max_requeues must be >= 0")
    for e in t.extra or []:
        if not isinstance(e, str) or not e.startswith("-") or "\n" in e:
            raise ConfigError(f"{where}: extra must list sbatch options such as "
                              f"\"--qos=high\", not {e!r}")
    return t


# ----------------------------------------------------------------------- the plan

@dataclass
class KernelPlan:
    """The tiles of the whole output and their grouping into array-task regions."""

    shape: tuple[int, int]
    chunks: tuple[int, int]
    tile: tuple[int, int]
    budget: int
    tiles: list[Tile]
    regions: list[Tile]  #: region i is computed by array index i
    geometry_from: str  #: where the output shape was learnt (store, simulate, source)

    def tiles_in(self, r: Tile) -> list[Tile]:
        return [t for t in self.tiles
                if r.r0 <= t.r0 and t.r1 <= r.r1 and r.c0 <= t.c0 and t.c1 <= r.c1]

    def as_json(self) -> dict:
        return {"shape": list(self.shape), "chunks": list(self.chunks),
                "tile": list(self.tile), "budget": self.budget,
                "tiles": [[t.r0, t.r1, t.c0, t.c1] for t in self.tiles],
                "regions": [[t.r0, t.r1, t.c0, t.c1] for t in self.regions],
                "geometry_from": self.geometry_from}

    @classmethod
    def from_json(cls, d: dict) -> KernelPlan:
        return cls(tuple(d["shape"]), tuple(d["chunks"]), tuple(d["tile"]), int(d["budget"]),
                   [Tile(*t) for t in d["tiles"]], [Tile(*t) for t in d["regions"]],
                   d.get("geometry_from", ""))


@dataclass
class Geometry:
    """What the planner needs to know about the store before it may exist."""

    n_test: int
    n_train: int
    classes: int
    itemsize: int
    run_chunk: int
    runs: int
    origin: str

    def examples(self, split: str) -> int:
        return self.n_test if split == "test" else self.n_train


def _geometry(cfg: JobConfig, store_path: Path, need_ingest: bool) -> Geometry:
    """The store's shape: from the store, else the simulation, else the first source file."""
    from .store import Store, auto_run_chunk

    if Store.exists(store_path) and not need_ingest:
        st = Store.open(store_path)
        s = st.shape
        return Geometry(s.n_test, s.n_train, s.classes, _itemsize(s.dtype), s.run_chunk,
                        st.runs, "store")
    ing = cfg.ingest
    if Store.exists(store_path):
        st = Store.open(store_path)
        s = st.shape
        return Geometry(s.n_test, s.n_train, s.classes, _itemsize(s.dtype), s.run_chunk,
                        max(st.runs, _source_runs(cfg) or 0), "store + source")
    if cfg.simulate and ing and Path(cfg.resolve(ing.source)) == Path(cfg.resolve(cfg.simulate.out)):
        sm = cfg.simulate
        rc = (ing.run_chunk if ing.run_chunk
              else auto_run_chunk(max(sm.n_test, sm.n_train), sm.classes, 2))
        return Geometry(sm.n_test, sm.n_train, sm.classes, 2, rc, sm.runs, "simulate")
    if ing is not None and ing.shape:
        from .cli import parse_shape

        n_test, n_train, classes = parse_shape(ing.shape)
        rc = ing.run_chunk or auto_run_chunk(max(n_test, n_train), classes, 2)
        # runs unknown until the ingest: plan for at least one full run-chunk; each task
        # plans its own run-chunks again from the store it then reads
        return Geometry(n_test, n_train, classes, 2, rc, max(ing.max_runs or 0, rc),
                        "[ingest] shape")
    if ing is None or "://" in ing.source:
        raise ConfigError(f"{cfg.path}: the store {store_path} does not exist yet and the "
                          "shape of a remote source is not known before it is read; set "
                          "[ingest] shape = \"N_TESTxN_TRAINxCLASSES\" (e.g. "
                          "\"10000x50000x10\"), or run the ingest first and submit again")
    files = _source_files(cfg)
    if not files:
        raise ConfigError(f"{cfg.path}: no files match {ing.glob!r} under "
                          f"{cfg.resolve(ing.source)}")
    n_test, n_train, classes, dtype, _ = _peek(files[0].path)
    itemsize = _itemsize(dtype)
    rc = ing.run_chunk or auto_run_chunk(max(n_test, n_train), classes, itemsize)
    return Geometry(n_test, n_train, classes, itemsize, rc, _source_runs(cfg) or 2, "source")


def _itemsize(dtype: str) -> int:
    import numpy as np

    return int(np.dtype(dtype).itemsize)


def _peek(path: Path) -> tuple[int, int, int, str, int]:
    """(n_test, n_train, classes, dtype, runs) of a log.pt without reading its tensors."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        te, tr = obj["logits"], obj["logits_train"]
        return (int(te.shape[1]), int(tr.shape[1]), int(te.shape[2]),
                str(te.dtype).removeprefix("torch."), int(te.shape[0]))
    except Exception as e:  # any unreadable file is reported by the ingest job itself
        raise ConfigError(f"{path}: cannot read its shape to plan the kernel ({e})") from None


def _source_files(cfg: JobConfig) -> list:
    from .sources import list_local

    ing = cfg.ingest
    src = Path(cfg.resolve(ing.source))
    if not src.is_dir():
        return []
    files = list_local(src, ing.glob)
    return files[:ing.max_files] if ing.max_files is not None else files


def _source_runs(cfg: JobConfig) -> int | None:
    if cfg.ingest is None or "://" in cfg.ingest.source:
        return None
    runs = 0
    for f in _source_files(cfg):
        try:
            runs += _peek(f.path)[4]
        except ConfigError:
            continue
    if cfg.ingest.max_runs is not None:
        runs = min(runs, cfg.ingest.max_runs)
    return runs or None


def split_tile(rows: int, cols: int, chunks: tuple[int, int], tile: tuple[int, int],
               tasks: int) -> tuple[int, int]:
    """A tile no larger than ``tile``, on the chunk grid, giving >= ``tasks`` tiles if it can.

    Among the tiles that do: the one giving the fewest tiles, then the smallest (tiles at
    the edges are cut short, so for a given count the smallest tile spreads the work most
    evenly), then the squarest (a task reads ``rows + cols`` examples of every run, so for
    a given area a square tile reads least).
    """
    cr, cc = chunks
    best = None
    for tr in range(cr, min(tile[0], _up(rows, cr)) + 1, cr):
        for tc in range(cc, min(tile[1], _up(cols, cc)) + 1, cc):
            n = math.ceil(rows / tr) * math.ceil(cols / tc)
            key = (n < tasks, n if n >= tasks else -n, tr * tc, tr + tc)
            if best is None or key < best[0]:
                best = (key, (tr, tc))
    return best[1] if best is not None else tile


def _up(n: int, step: int) -> int:
    return -(-n // step) * step


def group_regions(tiles: list[Tile], tasks: int) -> list[Tile]:
    """Group the tile grid into at most ``tasks`` rectangles of whole tiles (row-major).

    Of the groupings with at most ``tasks`` groups, the one with the most groups, then
    with the smallest largest group perimeter (what one task reads).
    """
    rows = sorted({(t.r0, t.r1) for t in tiles})
    cols = sorted({(t.c0, t.c1) for t in tiles})
    nr, nc = len(rows), len(cols)
    if nr * nc <= tasks:
        return sorted(tiles)
    best = None
    for gr in range(1, nr + 1):
        for gc in range(1, nc + 1):
            n = math.ceil(nr / gr) * math.ceil(nc / gc)
            if n > tasks:
                continue
            key = (-n, gr + gc)
            if best is None or key < best[0]:
                best = (key, gr, gc)
    _, gr, gc = best
    out = []
    for i in range(0, nr, gr):
        for j in range(0, nc, gc):
            r = rows[i:i + gr]
            c = cols[j:j + gc]
            out.append(Tile(r[0][0], r[-1][1], c[0][0], c[-1][1]))
    return out


def plan_kernel(cfg: JobConfig, t: SlurmTable, need_ingest: bool) -> KernelPlan:
    """The tile plan of the whole output and its regions (one per array task)."""
    from .jobs import kernel_config
    from .kernel import DEFAULT_CHUNKS, PAIRS, KernelOutput

    kc = kernel_config(cfg)
    kc.validate()
    g = _geometry(cfg, Path(kc.store), need_ingest)
    rsplit, csplit = PAIRS[kc.pairs]
    shape = (g.examples(rsplit), g.examples(csplit))
    runs = kc.runs if kc.runs is not None else g.runs
    chunks = kc.chunks
    if chunks is None and (Path(kc.out) / "kernel").exists():
        try:
            chunks = KernelOutput.open(kc.out).chunks
        except KernelOutputError:
            chunks = None
    chunks = tuple(chunks or (min(shape[0], DEFAULT_CHUNKS[0]),
                              min(shape[1], DEFAULT_CHUNKS[1])))
    budget = kc.max_memory or DEFAULT_TASK_BUDGET
    common = dict(classes=g.classes, budget=budget, chunks=chunks,
                  store_run_chunk=g.run_chunk, runs=max(runs, 1), in_itemsize=g.itemsize,
                  run_chunk=kc.run_chunk)
    p = plan(shape, tile=kc.tile, **common)
    if kc.tile is None:
        # the planner's tile, as the multiple of the chunks that tasks pass as --tile
        tile = (_up(max(x.rows for x in p.tiles), chunks[0]),
                _up(max(x.cols for x in p.tiles), chunks[1]))
        if t.tasks is not None and len(p.tiles) < t.tasks:
            tile = split_tile(shape[0], shape[1], chunks, tile, t.tasks)
        p = plan(shape, tile=tile, **common)
    else:
        tile = kc.tile
    tasks = t.tasks if t.tasks is not None else MAX_ARRAY_TASKS
    regions = group_regions(list(p.tiles), tasks)
    return KernelPlan(shape, chunks, tuple(tile), budget, list(p.tiles), regions, g.origin)


# ----------------------------------------------------------------------- the output

def _open_output(path: Path):  # noqa: ANN202
    from .kernel import KernelOutput

    if not (path / "kernel").exists():
        return None
    try:
        return KernelOutput.open(path, mode="r")
    except KernelOutputError:
        return None


def regions_done(kp: KernelPlan, out) -> list[bool]:  # noqa: ANN001
    """For each region: do finished tiles of the output's identity cover all its chunks?"""
    if out is None or tuple(out.array.shape) != tuple(kp.shape):
        return [False] * len(kp.regions)
    grid = out.done_grid()
    return [out.tile_done(r, grid) for r in kp.regions]


# ---------------------------------------------------------------------- the stages

@dataclass
class IngestState:
    needed: bool
    simulate: bool  #: the simulated source still has to be written
    files_total: int | None  #: source files (None: not countable from here)
    files_in_store: int
    runs_in_store: int
    rejected: int

    def line(self) -> str:
        if self.simulate:
            return f"the source is simulated first; {self.runs_in_store} runs in the store"
        total = "?" if self.files_total is None else str(self.files_total)
        s = (f"{self.files_in_store}/{total} file(s) in the store, "
             f"{self.runs_in_store} runs")
        if self.rejected:
            s += f", {self.rejected} rejected"
        return s


def ingest_state(cfg: JobConfig) -> IngestState:
    from .store import Store

    if cfg.ingest is None:
        return IngestState(False, False, None, 0, 0, 0)
    ing = cfg.ingest
    store_path = Path(cfg.resolve(ing.store))
    sim = bool(cfg.simulate) and not (Path(cfg.resolve(cfg.simulate.out)) / "labels.npz").exists()
    known: set[str] = set()
    rejected: set[str] = set()
    runs = 0
    if Store.exists(store_path):
        st = Store.open(store_path)
        known = st.known_names()
        rejected = {r["name"] for r in st.manifest.get("rejected", [])}
        runs = st.runs
    if "://" in ing.source:
        # a remote source is listed by the ingest job itself; its re-run skips known files
        return IngestState(True, sim, None, len(known), runs, len(rejected))
    names = {f.name for f in _source_files(cfg)}
    left = names - known - (rejected if ing.skip_bad else set())
    if ing.max_runs is not None and runs >= ing.max_runs:
        left = set()
    needed = sim or bool(left) or not Store.exists(store_path)
    return IngestState(needed, sim, len(names), len(known & names), runs,
                       len(rejected & names))


def _kernel_path(cfg: JobConfig) -> Path:
    return Path(cfg.resolve(cfg.kernel.out if cfg.kernel else "kernel")).resolve()


def _results_path(cfg: JobConfig) -> Path | None:
    if cfg.evaluate and cfg.evaluate.json:
        return Path(cfg.resolve(cfg.evaluate.json)).resolve()
    return None


def _gather_done(cfg: JobConfig, out) -> bool:  # noqa: ANN001
    if out is None or not out.attrs.get("complete"):
        return False
    res = _results_path(cfg)
    return res is None or res.exists()


# ------------------------------------------------------------------------ rendering

def template_dir(t: SlurmTable, cfg: JobConfig) -> Path:
    if t.templates:
        d = Path(t.templates)
        return d if d.is_absolute() else (cfg.path.parent / d)
    return Path(__file__).resolve().parent.parent / "slurm"


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


def _kernel_args(cfg: JobConfig, kp: KernelPlan) -> str:
    from .jobs import kernel_config

    kc = kernel_config(cfg)
    return _args([("--store", Path(kc.store).resolve()), ("--out", Path(kc.out).resolve()),
                  ("--runs", kc.runs), ("--pairs", kc.pairs), ("--device", kc.device),
                  ("--precision", kc.precision),
                  ("--max-memory", cfg.kernel.max_memory),
                  ("--chunks", f"{kp.chunks[0]}x{kp.chunks[1]}"),
                  ("--tile", f"{kp.tile[0]}x{kp.tile[1]}"),
                  ("--run-chunk", kc.run_chunk),
                  ("--log-softmax-fp32", kc.log_softmax_fp32),
                  ("--checkpoint-every", f"{kc.checkpoint_every:g}")])


def _abs(cfg: JobConfig, p: str) -> str:
    r = cfg.resolve(p)
    return r if "://" in r else str(Path(r).resolve())


def _ingest_args(cfg: JobConfig) -> str:
    i = cfg.ingest
    pairs = [("--store", _abs(cfg, i.store)),
             ("--glob", i.glob if i.glob != "**/log.pt" else None),
             ("--max-files", i.max_files), ("--max-runs", i.max_runs),
             ("--run-chunk", i.run_chunk), ("--skip-bad", i.skip_bad),
             ("--shape", i.shape)]
    remote = "://" in i.source
    if remote:
        pairs += [("--revision", i.revision), ("--download-workers", i.download_workers),
                  ("--retries", i.retries), ("--keep-downloads", i.keep_downloads),
                  ("--cache-dir", _abs(cfg, i.cache_dir) if i.cache_dir else None)]
    elif i.scheduler:
        pairs.append(("--scheduler", i.scheduler))
    elif i.workers is not None:
        pairs.append(("--workers", i.workers))
    text = f"{shlex.quote(_abs(cfg, i.source))} {_args(pairs, ' ')}"
    if not remote and not i.scheduler and i.workers is None:
        # one dask worker process per CPU of the job
        text += ' --workers "${SLURM_CPUS_PER_TASK:-1}"'
    return text


def _simulate_block(cfg: JobConfig, cmd: str) -> str:
    if not cfg.simulate:
        return ""
    s = cfg.simulate
    out = _abs(cfg, s.out)
    args = _args([("--runs", s.runs), ("--files", s.files), ("--n-train", s.n_train),
                  ("--n-test", s.n_test), ("--classes", s.classes), ("--seed", s.seed)], " ")
    return ("# The simulated source ([simulate] table), unless a complete one is there.\n"
            f"[ -e {shlex.quote(out + '/labels.npz')} ] || "
            f"{cmd} simulate {shlex.quote(out)} {args}\n")


def _command(t: SlurmTable) -> str:
    return t.command or f"{shlex.quote(sys.executable)} -m kernelscale"


def _setup(t: SlurmTable) -> str:
    if not t.setup.strip():
        return ""
    return "# Site set-up ([slurm] setup).\n" + t.setup.rstrip("\n") + "\n"


def render_scripts(cfg: JobConfig, t: SlurmTable, kp: KernelPlan | None, log_dir: Path,
                   todo: list[int] | None = None) -> dict[str, str]:
    """The sbatch scripts of the job's stages; the array asks for the regions ``todo``."""
    tdir = template_dir(t, cfg)
    cmd = _command(t)
    name = job_name(cfg)
    common = {"job_name": name, "job_file": str(cfg.path.resolve()),
              "log_dir": str(log_dir), "setup": _setup(t), "kernelscale": cmd}
    out = {}

    def load(stage: str) -> str:
        p = tdir / TEMPLATES[stage]
        try:
            return p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the sbatch template ({e.strerror})") from None

    if cfg.ingest is not None and kp is not None:
        out["ingest"] = render(load("ingest"), {
            **common, "simulate": _simulate_block(cfg, cmd), "ingest_args": _ingest_args(cfg),
            "kernel_args": _kernel_args(cfg, kp).replace(" \\\n    ", " "),
            "resources": _resources(t, t.ingest_time, t.ingest_cpus, t.ingest_mem, None)},
            TEMPLATES["ingest"])
    if kp is not None:
        regions = "\n".join(f'    "{r.r0}:{r.r1} {r.c0}:{r.c1}"  # {i}'
                            for i, r in enumerate(kp.regions))
        out["kernel"] = render(load("kernel"), {
            **common, "regions": regions, "kernel_args": _kernel_args(cfg, kp),
            "array": array_spec(list(range(len(kp.regions))) if todo is None else todo,
                                t.max_parallel),
            "signal_lead": str(t.signal_lead), "max_requeues": str(t.max_requeues),
            "resources": _resources(t, t.time, t.cpus_per_task, t.mem, t.gres or None)},
            TEMPLATES["kernel"])
    gather_args = (f"{shlex.quote(str(cfg.path.resolve()))} --workdir "
                   f"{shlex.quote(str(cfg.workdir.resolve()))}")
    out["gather"] = render(load("gather"), {
        **common, "gather_args": gather_args,
        "resources": _resources(t, t.gather_time, t.gather_cpus, t.gather_mem,
                                t.gather_gres or None)},
        TEMPLATES["gather"])
    return out


def job_name(cfg: JobConfig) -> str:
    """The job's name made safe for Slurm's --job-name and squeue's --name lists."""
    return re.sub(r"[^\w.-]", "_", cfg.job.name) or "job"


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


# ------------------------------------------------------------------------ squeue

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


def _sbatch(script: Path, dependency: str | None) -> str:
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


def _scancel(ids: list[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)


# ------------------------------------------------------------------------- records

def record_dir(cfg: JobConfig, t: SlurmTable) -> Path:
    d = Path(t.log_dir)
    return (d if d.is_absolute() else cfg.workdir / d).resolve()


def _load_submissions(d: Path) -> list[dict]:
    p = d / "submitted.json"
    if not p.exists():
        return []
    try:
        return list(read_json(p)["submissions"])
    except (OSError, ValueError, KeyError):
        raise SlurmError(f"{p}: unreadable submission record") from None


def _jobs_of(subs: list[dict]) -> list[tuple[str, str, str]]:
    """(stage, job id, name) of every job of every submission."""
    return [(stage, j["id"], j["name"]) for s in subs for stage, j in s["jobs"].items()]


def _queue_of(subs: list[dict]) -> list[QueueEntry] | None:
    """squeue's view of the recorded jobs (ids are matched with names: ids restart)."""
    jobs = _jobs_of(subs)
    if not jobs:
        return []
    q = squeue(sorted({n for _, _, n in jobs}))
    if q is None:
        return None
    ours = {(i, n) for _, i, n in jobs}
    return [e for e in q if (e.base, e.name) in ours]


# ------------------------------------------------------------------------- submit

def _plan_text(cfg: JobConfig, ist: IngestState, kp: KernelPlan | None,
               todo: list[int], done: list[bool], gather: bool, commands: list[str]) -> str:
    lines = [f"job {cfg.job.name}: workdir {cfg.workdir.resolve()}"]
    if cfg.ingest is not None:
        if ist.needed:
            what = "simulate, then ingest" if ist.simulate else "ingest"
            lines.append(f"  ingest: {what} into {_abs(cfg, cfg.ingest.store)} "
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
        later = [n for n in ("curve", "report") if getattr(cfg, n, None) is not None]
        lines.append("  gather: check every tile, mark the kernel complete"
                     + (f", evaluate -> {res}" if cfg.evaluate else "")
                     + (f", then {' and '.join(later)}" if later else ""))
    lines.append("sbatch:" if commands else "sbatch: nothing to submit")
    lines += [f"  {c}" for c in commands]
    return "\n".join(lines)


def submit(job: str | Path, *, workdir: str | None = None, dry_run: bool = False,
           overrides: dict | None = None) -> int:
    """Submit what the job still needs (see the module docstring); 0 on success."""
    cfg = load_job(job, workdir)
    t = slurm_settings(cfg, overrides)
    if cfg.kernel is None:
        raise ConfigError(f"{cfg.path}: `submit` needs a [kernel] table")
    d = record_dir(cfg, t)
    subs = _load_submissions(d)
    if not dry_run:
        _check_previous(subs)

    ist = ingest_state(cfg)
    kp = plan_kernel(cfg, t, ist.needed)
    kpath = _kernel_path(cfg)
    if not ist.needed and not dry_run:
        # the store is final: create (or check) the output now, before any task runs
        from .jobs import kernel_config
        from .kernel import prepare_output

        kc = dataclasses.replace(kernel_config(cfg), chunks=kp.chunks)
        prepare_output(kc)
    out = _open_output(kpath)
    done = [False] * len(kp.regions) if ist.needed else regions_done(kp, out)
    todo = [i for i, ok in enumerate(done) if not ok]
    gather = bool(todo) or ist.needed or not _gather_done(cfg, out)

    scripts = render_scripts(cfg, t, kp, d, todo)
    paths = {"ingest": d / "ingest.sbatch", "kernel": d / "kernel-array.sbatch",
             "gather": d / "gather.sbatch"}
    stages = (["ingest"] if ist.needed else []) + (["kernel"] if todo else []) \
        + (["gather"] if gather else [])
    commands = []
    for i, stage in enumerate(stages):
        dep = f" --dependency=afterok:<{stages[i - 1]} job>" if i else ""
        commands.append(f"sbatch --parsable{dep} {paths[stage]}")
    print(_plan_text(cfg, ist, kp, todo, done, gather, commands))
    if dry_run:
        for stage in stages:
            print(f"\n==> {paths[stage]} <==")
            print(scripts[stage], end="")
        return 0
    if not stages:
        return 0

    d.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        atomic_write_bytes(paths[stage], scripts[stage].encode())
    atomic_write_json(d / "plan.json", kp.as_json())
    submitted: dict[str, dict] = {}
    prev_id = None
    try:
        for stage in stages:
            jid = _sbatch(paths[stage], prev_id)
            submitted[stage] = {"id": jid, "name": f"{job_name(cfg)}-{stage}",
                                "script": str(paths[stage])}
            if stage == "kernel":
                submitted[stage]["indices"] = todo
            prev_id = jid
    except SlurmError:
        _scancel([j["id"] for j in submitted.values()])
        raise
    subs.append({"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "jobs": submitted})
    atomic_write_json(d / "submitted.json", {"submissions": subs})
    print("submitted: " + ", ".join(f"{s} {j['id']}" for s, j in submitted.items())
          + f"; logs in {d}")
    return 0


def _check_previous(subs: list[dict]) -> None:
    """Refuse while an earlier submission still runs; cancel jobs that never can."""
    q = _queue_of(subs)
    if q is None:
        raise SlurmError("squeue: not available, cannot check earlier submissions")
    stale = [e for e in q if e.state == "PENDING" and "DependencyNeverSatisfied" in e.reason]
    if stale:
        ids = sorted({e.job_id for e in stale})
        print(f"submit: cancelling job(s) {', '.join(ids)}: their dependencies failed",
              file=sys.stderr)
        _scancel(ids)
    active = [e for e in q if e.state in ACTIVE_STATES and e not in stale]
    if active:
        ids = ", ".join(f"{e.job_id} ({e.name} {e.state})" for e in active[:10])
        raise SlurmError(f"earlier submission still queued or running: {ids}; wait for it "
                         "(`kernelscale status`) or scancel it, then submit again")


# ------------------------------------------------------------------------- gather

def read_plan(cfg: JobConfig, t: SlurmTable) -> KernelPlan:
    p = record_dir(cfg, t) / "plan.json"
    try:
        return KernelPlan.from_json(read_json(p))
    except FileNotFoundError:
        raise SlurmError(f"{p}: no tile plan; was the job submitted "
                         "(`kernelscale submit`)?") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SlurmError(f"{p}: unreadable tile plan") from None


def gather(job: str | Path, *, workdir: str | None = None, evaluate: bool = True) -> int:
    """Check every planned tile against the done-markers, mark complete, evaluate; then
    the job's ``[curve]`` and ``[report]`` stages, when it has them."""
    from .kernel import KernelOutput

    cfg = load_job(job, workdir)
    t = slurm_settings(cfg)
    kp = read_plan(cfg, t)
    kpath = _kernel_path(cfg)
    out = KernelOutput.open(kpath, mode="r+")
    ident = out.attrs.get("identity", {})
    if tuple(out.array.shape) != tuple(kp.shape) or out.chunks != tuple(kp.chunks):
        raise SlurmError(f"{kpath}: shape {tuple(out.array.shape)} chunks {out.chunks} "
                         f"differ from the plan's {tuple(kp.shape)} {tuple(kp.chunks)}")
    cr, cc = out.chunks
    n_rows, n_cols = kp.shape
    for m in sorted(out.done_dir.glob("*.json")) if out.done_dir.is_dir() else []:
        info = read_json(m)
        if info.get("identity") != ident:
            continue  # a marker of an earlier kernel at this path: done_grid ignores it too
        r0, r1, c0, c1 = info["tile"]
        on_grid = (r0 % cr == 0 and c0 % cc == 0 and (r1 % cr == 0 or r1 == n_rows)
                   and (c1 % cc == 0 or c1 == n_cols))
        if not on_grid or info.get("runs") != ident.get("runs"):
            raise SlurmError(f"{m}: done-marker off the chunk grid or of another run "
                             f"count (tile {info['tile']}, runs {info.get('runs')})")
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
        from .jobs import run_after_kernel

        run_after_kernel(cfg, True, None)
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


def status(job: str | Path, *, workdir: str | None = None) -> int:
    """Print, per stage, what is done, running, failed (with its log) and left."""
    cfg = load_job(job, workdir)
    t = slurm_settings(cfg)
    d = record_dir(cfg, t)
    subs = _load_submissions(d)
    q = _queue_of(subs)
    lines = [f"job {cfg.job.name}: workdir {cfg.workdir.resolve()}; "
             f"{len(subs)} submission(s), records in {d}"]
    if q is None:
        lines.append("  (squeue not available: running and failed jobs are not shown)")
    states: dict[str, QueueEntry] = {e.job_id: e for e in (q or [])}

    def latest(stage: str) -> dict | None:
        for s in reversed(subs):
            if stage in s["jobs"]:
                return s["jobs"][stage]
        return None

    def job_line(stage: str, log_pattern: str) -> str:
        j = latest(stage)
        if j is None:
            return ""
        e = states.get(j["id"])
        log = d / log_pattern.format(id=j["id"])
        if e is None:
            return f"; job {j['id']} (not in the queue; log {log})"
        s = f"; job {j['id']} {e.state}"
        if e.state == "PENDING" and e.reason not in ("None", ""):
            s += f" ({e.reason})"
        if e.state in FAILED_STATES:
            s += f", log {log}"
        return s

    ist = ingest_state(cfg)
    if cfg.ingest is not None:
        word = "left" if ist.needed else "done"
        lines.append(f"  ingest: {word}: {ist.line()}{job_line('ingest', 'ingest-{id}.out')}")
    try:
        kp = read_plan(cfg, t)
    except SlurmError:
        kp = None
    out = _open_output(_kernel_path(cfg))
    if cfg.kernel is not None:
        if kp is None:
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
                log = d / f"kernel-{jid}_{i}.out"
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
    lines.append(f"  gather: {what}{extra}{job_line('gather', 'gather-{id}.out')}")
    print("\n".join(lines))
    return 0
