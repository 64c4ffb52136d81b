"""``kernelscale verify``: every chunk, statistic and count of a store or a kernel checked,
each problem reported with its path and how to repair it; and the two repairs.

A store is checked for: the manifest's file run ranges covering ``0..runs`` in order;
both logits arrays holding at least the committed runs; every chunk file of the
committed runs present, of its array's size and matching its CRC-32C; the statistics
generation the manifest names readable (Zarr checks their CRC-32C) and matching the
manifest's ``stats_sha256``. A kernel is checked for: every chunk file of its finished
tiles present, of its size and matching its CRC-32C; its done-markers on the chunk grid;
a top-K kernel's tile partials readable and its ``values``/``indices`` chunks intact.

Repairs, without starting over: :func:`repair_store` rewrites damaged logits chunks from
the source files of their runs (each checked against the sha256 the manifest recorded);
:func:`repair_kernel` removes the done-markers of the tiles holding damaged chunks, so
the same ``kernelscale kernel`` command recomputes exactly those tiles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError, KernelscaleError, StoreError
from .rawchunks import ChunkDamaged, chunk_path, raw_layout, verify_chunk, write_chunk
from .store import Store
from .store_layout import SPLITS
from .store_stats import write_generation


@dataclass
class Problem:
    """One damaged thing: its path, what is wrong, how to repair it."""

    path: Path
    problem: str
    repair: str = ""

    def line(self) -> str:
        return f"{self.path}: {self.problem}" + (f"; {self.repair}" if self.repair else "")


@dataclass
class Report:
    """What :func:`verify` found in ``path`` (a ``store`` or a ``kernel``)."""

    path: Path
    kind: str
    checked: int = 0  #: chunk files and arrays checked
    checksummed: bool = True  #: whether its chunks carry CRC-32Cs (older outputs do not)
    problems: list[Problem] = field(default_factory=list)

    def line(self) -> str:
        crc = "" if self.checksummed else " (written without checksums: sizes only)"
        return (f"verify: {self.kind} {self.path}: {self.checked} item(s) checked{crc}, "
                f"{len(self.problems)} problem(s)")


def verify(path: str | Path) -> Report:
    """Check the store or kernel at ``path``; see the module docstring."""
    p = Path(path)
    if Store.exists(p):
        return verify_store(p)
    if (p / "kernel" / "zarr.json").is_file() or (p / "values" / "zarr.json").is_file():
        return verify_kernel(p)
    raise BadInputError(f"{p}: neither a kernelscale store nor a kernel")


def verify_store(path: Path) -> Report:
    store = Store.open(path)
    rep = Report(path, "store")
    m = store.manifest
    at = 0
    for f in m["files"]:
        if f["run_start"] != at or f["run_stop"] <= f["run_start"]:
            rep.problems.append(Problem(path / "manifest.json", f"file {f['name']} holds runs "
                                        f"{f['run_start']}:{f['run_stop']}, expected to start "
                                        f"at {at}", "re-create the store"))
        at = f["run_stop"]
    if at != store.runs:
        rep.problems.append(Problem(path / "manifest.json", f"files cover {at} runs, the "
                                    f"manifest says {store.runs}", "re-create the store"))
    rc = store.shape.run_chunk
    for split in SPLITS:
        arr = store.array(split)
        rep.checksummed &= store.checksummed(split)
        if arr.shape[0] < store.runs:
            rep.problems.append(Problem(path / "logits" / split, f"holds {arr.shape[0]} "
                                        f"runs, the manifest {store.runs}",
                                        "re-create the store"))
            continue
        layout = store.chunks(split).layout
        size = rc * store.shape.run_bytes(split)
        for ci in range(-(-store.runs // rc)):
            chunk = chunk_path(path / "logits" / split, (ci, 0, 0))
            rep.checked += 1
            if layout is None:
                continue
            problem = verify_chunk(chunk, size, layout.checksum)
            if problem:
                rep.problems.append(Problem(chunk, problem, store.repair_hint(chunk)))
    if store.runs:
        gen = int(m["stats_generation"])
        digest = hashlib.sha256()
        for split in SPLITS:
            for name in ("mean", "m2"):
                where = path / "stats" / f"g{gen}" / f"{split}_{name}"
                rep.checked += 1
                try:
                    val = store.group["stats"][f"g{gen}"][f"{split}_{name}"][...]
                except (KeyError, ValueError, OSError) as e:
                    rep.problems.append(Problem(where, f"unreadable ({_why(e)})",
                                                f"recompute with `kernelscale verify {path} "
                                                "--repair SOURCE`"))
                    digest = None
                    break
                if digest is not None:
                    digest.update(np.ascontiguousarray(val).tobytes())
            if digest is None:
                break
        if digest is not None and digest.hexdigest() != m["stats_sha256"]:
            rep.problems.append(Problem(path / "stats" / f"g{gen}", "statistics do not match "
                                        "the manifest's stats_sha256",
                                        f"repair with `kernelscale verify {path} --repair "
                                        "SOURCE`"))
    return rep


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return "checksum mismatch" if "checksum" in text.lower() else text[:120]


def verify_kernel(path: Path) -> Report:
    from .output import KernelOutput

    k = KernelOutput.open(path, mode="r")
    rep = Report(path, "kernel")
    try:
        k.check_markers()
    except KernelscaleError as e:
        rep.problems.append(Problem(path / ".done", str(e), "remove the marker and re-run "
                                    "`kernelscale kernel`"))
    if k.topk:
        _verify_topk(k, path, rep)
        return rep
    layout = raw_layout(k.array)
    rep.checksummed = layout is not None and layout.checksum
    (cr, cc) = k.chunks
    grid = k.done_grid()
    for i, j in zip(*np.nonzero(grid), strict=True):
        chunk = chunk_path(path / "kernel", (int(i), int(j)))
        rep.checked += 1
        if layout is None:
            continue
        problem = verify_chunk(chunk, cr * cc * 4, layout.checksum)
        if problem:
            rep.problems.append(Problem(chunk, problem, f"recompute its tile with `kernelscale "
                                        f"verify {path} --repair` then the same `kernelscale "
                                        "kernel` command"))
    return rep


def _verify_topk(k, path: Path, rep: Report) -> None:
    """A top-K kernel: an unfinished one's partial top-Ks of its finished tiles readable
    (zip CRC-32) and of their shape; a complete one's ``values``/``indices`` chunks
    present and matching their CRC-32C."""
    from .errors import KernelOutputError

    # the partials of rows still to merge (a complete kernel's are merged and gone, as
    # are those of rows merged before a repair)
    tiles = [] if k.attrs.get("complete") else k.done_tiles()
    pending = {(t, r0, r1) for t in tiles for r0, r1 in k.partial_rows(t)}
    rows = {r0 for t, r0, _ in pending if k.partial_path(t, r0).is_file()}
    for t, r0, r1 in sorted(x for x in pending if x[1] in rows):
        rep.checked += 1
        try:
            k.load_partial(t, r0, r1)
        except KernelOutputError as e:
            rep.problems.append(Problem(k.partial_path(t, r0),
                                        str(e).split(": ", 1)[-1].split(";")[0],
                                        f"recompute its tile with `kernelscale verify {path} "
                                        "--repair` then the same `kernelscale kernel` "
                                        "command"))
    if not k.attrs.get("complete"):
        return
    from .kernelread import topk_chunk_files

    for chunk, nbytes, checksum in topk_chunk_files(k):
        rep.checked += 1
        problem = verify_chunk(chunk, nbytes, checksum)
        if problem:
            rep.problems.append(Problem(chunk, problem, "rebuild it from the tiles' partial "
                                        f"top-Ks with `kernelscale verify {path} --repair` "
                                        "then the same `kernelscale kernel` command"))


def repair_kernel(path: Path, rep: Report) -> int:
    """Remove the done-markers of the finished tiles that hold a damaged chunk; returns
    how many. The same ``kernelscale kernel`` command then recomputes those tiles. A
    top-K kernel: a damaged partial loses its tile's marker; a damaged ``values`` or
    ``indices`` chunk loses those of every tile over its rows (and over the rows those
    tiles span), whose recomputed partials the next run merges into those rows only."""
    from .output import KernelOutput

    k = KernelOutput.open(path, mode="a")
    cr, cc = k.chunks
    bad = set()
    partials = set()
    merged: set[int] = set()
    for p in rep.problems:
        rel = p.path.relative_to(path).parts
        if rel[:2] == ("kernel", "c") and len(rel) == 4:
            bad.add((int(rel[2]), int(rel[3])))
        elif rel[:1] == (".partial",) and len(rel) == 2:
            partials.add(rel[1].split("@")[0])  # <tile>@r<row>.npz
        elif rel[:1] in (("values",), ("indices",)) and rel[1:2] == ("c",):
            # values/c/<row chunk>/0: the first row of that chunk
            merged.add(int(rel[2]) * int(k.group[rel[0]].chunks[0]))
    tiles = k.done_tiles()
    redo = {t for t in tiles if t.key in partials or {
        (i, j) for i in range(t.r0 // cr, -(-t.r1 // cr))
        for j in range(t.c0 // cc, -(-t.c1 // cc))} & bad}
    if merged:
        redo |= _rows_closure(tiles, merged)
    for t in redo:
        (k.done_dir / f"{t.key}.json").unlink(missing_ok=True)
        for r0, _ in k.partial_rows(t) if k.topk else []:
            k.partial_path(t, r0).unlink(missing_ok=True)
    if redo and k.attrs.get("complete"):
        k.group.attrs["complete"] = False
    return len(redo)


def _rows_closure(tiles, rows: set[int]) -> set:
    """Every tile that must be recomputed to rebuild the merged top-K of the row chunks
    starting at ``rows``: the tiles over those rows, and, as a recomputed tile brings
    back the partials of all its rows, the tiles over those rows too."""
    redo: set = set()
    while True:
        more = {t for t in tiles if t not in redo and any(t.r0 <= r < t.r1 for r in rows)}
        if not more:
            return redo
        redo |= more
        rows = rows | {r for t in more for r in range(t.r0, t.r1)}


def repair_store(path: Path, source: str | Path, rep: Report) -> int:
    """Rewrite every damaged logits chunk of the store at ``path`` from the local copies
    under ``source`` of the files its runs came from; returns the chunks rewritten.

    Each source file must have the sha256 the manifest recorded; its runs are written
    back exactly as ingested. Statistics are not touched: a damaged statistics
    generation is recomputed from the (repaired) logits.
    """
    from .logfile import load_log, sha256_file

    store = Store.open(path, mode="a")
    src = Path(source)
    rewritten = 0
    with store.writer():
        for p in rep.problems:
            rel = p.path.relative_to(path).parts
            if rel[0] != "logits" or len(rel) < 4:
                continue
            split, lo, hi = store.chunk_runs(p.path)
            rc, per_run = store.shape.run_chunk, store.shape.run_bytes(split)
            chunk = np.zeros(rc * per_run, dtype=np.uint8)
            for f in store.manifest["files"]:
                a, b = max(lo, f["run_start"]), min(hi, f["run_stop"])
                if a >= b:
                    continue
                local = src / f["name"]
                if not local.is_file() or sha256_file(local) != f["sha256"]:
                    raise BadInputError(f"{local}: not the file ingested as {f['name']} "
                                        f"(sha256 {f['sha256']}); point --repair at the "
                                        "source the store was ingested from")
                log = load_log(local, f["name"])
                x = log.test if split == "test" else log.train
                part = np.ascontiguousarray(x[a - f["run_start"]:b - f["run_start"]])
                chunk[(a - lo) * per_run:(b - lo) * per_run] = part.reshape(-1).view(np.uint8)
            write_chunk(p.path, chunk, store.checksummed(split), durable=True)
            rewritten += 1
        if any(p.path.relative_to(path).parts[0] == "stats" for p in rep.problems):
            _recompute_stats(store)
            rewritten += 1
    return rewritten


def _recompute_stats(store: Store) -> None:
    """Recompute the current statistics generation from the logits, file by file and
    merged in order as ingest did; record their digest in the manifest (equal to the
    old one when computed on the same kind of device as the ingest)."""
    from .atomic import atomic_write_json
    from .stats import RunningStats, stats_of_logits

    gen = int(store.manifest["stats_generation"])
    stats = {}
    for split in SPLITS:
        st = RunningStats.empty(store.shape.examples(split), store.shape.classes)
        for f in store.manifest["files"]:
            st = st.merge(stats_of_logits(store.read(split, f["run_start"], f["run_stop"]),
                                          store.transform))
        stats[split] = st
    digest = write_generation(store.group, gen, stats)  # also when it went missing
    if digest != store.manifest["stats_sha256"]:
        m = dict(store.manifest, stats_sha256=digest)
        atomic_write_json(store.root / "manifest.json", m)
        store.manifest = m
        print(f"verify: {store.root}: statistics recomputed; they differ from the ingested "
              "ones by rounding, so the store's fingerprint changed (kernels of it need "
              "--restart)")


def check_readable(path: Path) -> None:
    """Raise :class:`StoreError` naming the first damaged item of ``path``, if any."""
    rep = verify(path)
    if rep.problems:
        raise StoreError(rep.problems[0].line())


__all__ = ["ChunkDamaged", "Problem", "Report", "check_readable", "repair_kernel",
           "repair_store", "verify", "verify_kernel", "verify_store"]
