"""What the submitter knows before anything runs: the output's shape, the array plan,
and how far the ingest got.

The store may not exist when a job is submitted (its ingest is the first Slurm job), so
the output's shape comes from the store, else the ``[simulate]`` table, else a declared
``[ingest] shape``, else the headers of a local source's files in any input format
(:mod:`kernelscale.runcount`; no array is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import JobConfig, SlurmTable
from ..errors import ConfigError, KernelOutputError
from ..ingestion import open_ingest_source
from ..jobtables import MAX_ARRAY_TASKS
from ..output import DEFAULT_CHUNKS, PAIRS, KernelOutput
from ..plan import ArrayPlan, group_regions, plan, round_up, split_tile
from ..runcount import FileRuns, RunCounter, RunShape, known_runs
from ..sources.base import is_local_spec
from ..store import Store
from ..store_layout import auto_run_chunk

#: Tile budget (device bytes) for planning when the job sets neither ``[kernel] tile`` nor
#: ``max_memory``: the submitting host cannot see the GPUs, and 8 GiB fits any current
#: datacenter GPU with room for the framework.
DEFAULT_TASK_BUDGET = 8 << 30


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
    if cfg.simulate and ing and Path(cfg.path_of(ing.source)) == Path(cfg.path_of(cfg.simulate.out)):
        sm = cfg.simulate
        rc = (ing.run_chunk if ing.run_chunk
              else auto_run_chunk(max(sm.n_test, sm.n_train), sm.classes, 2))
        return Geometry(sm.n_test, sm.n_train, sm.classes, 2, rc, sm.runs, "simulate")
    if ing is not None and ing.shape:
        n_test, n_train, classes = ing.shape
        rc = ing.run_chunk or auto_run_chunk(max(n_test, n_train), classes, 2)
        # runs unknown until the ingest: plan for at least one full run-chunk; each task
        # plans its own run-chunks again from the store it then reads
        return Geometry(n_test, n_train, classes, 2, rc, max(ing.max_runs or 0, rc),
                        "[ingest] shape")
    if ing is None or not is_local_spec(ing.source):
        raise ConfigError(f"{cfg.path}: the store {store_path} does not exist yet and the "
                          "shape of a remote source is not known before it is read; set "
                          "[ingest] shape = \"N_TESTxN_TRAINxCLASSES\" (e.g. "
                          "\"10000x50000x10\"), or run the ingest first and submit again")
    counted = count_source(cfg)
    if not counted.files:
        raise ConfigError(f"{cfg.path}: no files match {ing.glob!r} under "
                          f"{cfg.path_of(ing.source)}")
    shape = counted.shape
    if shape is None:
        why = f" ({counted.notes[0]})" if counted.notes else ""
        raise ConfigError(f"{cfg.path}: cannot read the shape of any source file to plan "
                          f"the kernel{why}; set [ingest] shape = \"N_TESTxN_TRAINxCLASSES\"")
    itemsize = _itemsize(shape.dtype)
    rc = ing.run_chunk or auto_run_chunk(max(shape.n_test, shape.n_train), shape.classes,
                                         itemsize)
    return Geometry(shape.n_test, shape.n_train, shape.classes, itemsize, rc,
                    counted.runs(ing.max_runs) or 2, "source")


def _itemsize(dtype: str) -> int:
    return int(np.dtype(dtype).itemsize)


@dataclass
class SourceCount:
    """The units an ingest of a job's local source would take (files, pairs of ``.npy``
    files, Zarr blocks; ``--max-files``), their runs read from their headers in any
    format (:class:`~kernelscale.runcount.RunCounter`), the shape of the first one read,
    and why those not read were not."""

    files: list[FileRuns]
    shape: RunShape | None
    notes: list[str]

    def runs(self, max_runs: int | None = None) -> int | None:
        """The runs known, at most ``max_runs``; None when none is known."""
        runs = known_runs(self.files) or 0
        if max_runs is not None:
            runs = min(runs, max_runs)
        return runs or None


def count_source(cfg: JobConfig, read: bool = True) -> SourceCount:
    """:class:`SourceCount` of the job's ``[ingest]`` source, a local folder or Zarr group
    (empty when it does not exist yet); no array is read, and no header either unless
    ``read`` (the units' names and sizes only)."""
    icfg = cfg.ingest_config(show_progress=False)
    if not Path(icfg.source).is_dir():
        return SourceCount([], None, [])
    src = open_ingest_source(icfg)
    try:
        files = src.list(icfg.glob)
        files = files[:icfg.max_files] if icfg.max_files is not None else files
        counter = RunCounter(src, probe=None if read else 0, keys=icfg.keys,
                             every_file=True)
        runs, shape = counter.count(files)
    finally:
        src.close()
    return SourceCount(runs, shape, counter.notes)


def _source_runs(cfg: JobConfig) -> int | None:
    if cfg.ingest is None or not is_local_spec(cfg.ingest.source):
        return None
    return count_source(cfg).runs(cfg.ingest.max_runs)


def plan_array(cfg: JobConfig, t: SlurmTable, need_ingest: bool) -> ArrayPlan:
    """The tile plan of the whole output and its regions (one per array task)."""
    kc = cfg.kernel_config()
    kc.validate()
    g = _geometry(cfg, Path(kc.store), need_ingest)
    rsplit, csplit = PAIRS[kc.pairs]
    shape = (g.examples(rsplit), g.examples(csplit))
    runs = kc.runs if kc.runs is not None else g.runs
    chunks = kc.chunks
    if chunks is None and (Path(kc.out) / "zarr.json").is_file():  # full or top-K
        try:
            chunks = KernelOutput.open(kc.out).chunks
        except KernelOutputError:
            chunks = None
    chunks = tuple(chunks or (min(shape[0], DEFAULT_CHUNKS[0]),
                              min(shape[1], DEFAULT_CHUNKS[1])))
    budget = kc.max_memory or DEFAULT_TASK_BUDGET
    common = dict(classes=g.classes, budget=budget, chunks=chunks,
                  store_run_chunk=g.run_chunk, runs=max(runs, 1), in_itemsize=g.itemsize,
                  runs_per_step=kc.runs_per_step)
    p = plan(shape, tile=kc.tile, **common)
    if kc.tile is None:
        # the planner's tile, as the multiple of the chunks that tasks pass as --tile
        tile = (round_up(max(x.rows for x in p.tiles), chunks[0]),
                round_up(max(x.cols for x in p.tiles), chunks[1]))
        if t.tasks is not None and len(p.tiles) < t.tasks:
            tile = split_tile(shape[0], shape[1], chunks, tile, t.tasks)
        p = plan(shape, tile=tile, **common)
    else:
        tile = kc.tile
    tasks = t.tasks if t.tasks is not None else MAX_ARRAY_TASKS
    regions = group_regions(list(p.tiles), tasks)
    return ArrayPlan(shape, chunks, tuple(tile), budget, list(p.tiles), regions, g.origin)


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
    if cfg.ingest is None:
        return IngestState(False, False, None, 0, 0, 0)
    ing = cfg.ingest
    store_path = Path(cfg.path_of(ing.store))
    sim = bool(cfg.simulate) and not (Path(cfg.path_of(cfg.simulate.out)) / "labels.npz").exists()
    known: set[str] = set()
    rejected: set[str] = set()
    runs = 0
    if Store.exists(store_path):
        st = Store.open(store_path)
        known = st.known_names()
        rejected = {r["name"] for r in st.manifest.get("rejected", [])}
        runs = st.runs
    if not is_local_spec(ing.source):
        # a remote source is listed by the ingest job itself; its re-run skips known files
        return IngestState(True, sim, None, len(known), runs, len(rejected))
    names = {f.name for f in count_source(cfg, read=False).files}
    left = names - known - (rejected if ing.skip_bad else set())
    if ing.max_runs is not None and runs >= ing.max_runs:
        left = set()
    needed = sim or bool(left) or not Store.exists(store_path)
    return IngestState(needed, sim, len(names), len(known & names), runs,
                       len(rejected & names))
