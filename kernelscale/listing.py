"""``kernelscale ls``: what a source holds, folder by folder -- files, bytes, and runs --
without downloading any file whole.

A Hub source is pinned to one commit first (as ingest pins it), so the listing and
every byte read describe one state of the repo. The files matching a glob are grouped by
their folder ``depth`` levels below the source; each folder's ``.npy`` files are paired
by name and each Zarr group's two arrays' metadata made one unit, and the runs of its
units in every input format are counted by :class:`~kernelscale.runcount.RunCounter`,
each count naming its method (a header, the zip directory, the file size, a Zarr
array's metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ConfigError
from .formats.common import DEFAULT_KEYS
from .formats.zarr_io import metadata_names
from .runcount import (
    DEFAULT_PROBE,
    METHODS,
    FileRuns,
    RunCounter,
    RunShape,
    known_runs,
    method_counts,
    methods_text,
)
from .sources import FetchOptions, Source, SourceFile, is_local_spec, open_source
from .sources.pairs import pair_npy
from .units import format_bytes


@dataclass
class Folder:
    """A folder of the listing and its files' runs."""

    name: str
    files: list[FileRuns]
    shape: RunShape | None = None

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_json(self) -> dict:
        return {"folder": self.name, "files": _count(self.files), "bytes": self.bytes,
                "runs": known_runs(self.files),
                "runs_known_files": sum(f.runs is not None for f in self.files),
                "methods": method_counts(self.files),
                "shape": self.shape.as_json() if self.shape else None,
                "entries": [f.as_json() for f in self.files]}


@dataclass
class Listing:
    """What ``kernelscale ls`` found: the source (``record``: its kind, and for the Hub
    the repo, revision and commit), and its folders."""

    source: str
    record: dict
    glob: str
    depth: int
    folders: list[Folder]
    probe: int | None
    files_read: int = 0
    candidates: int = 0  #: files named as a format holding runs (read or not)
    requests: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[FileRuns]:
        return [f for d in self.folders for f in d.files]

    def as_json(self) -> dict:
        files = self.files
        return {"source": self.source, **{k: v for k, v in self.record.items()
                                          if k != "glob"},
                "glob": self.glob, "depth": self.depth,
                "folders": [d.as_json() for d in self.folders],
                "total": {"files": _count(files), "bytes": sum(f.size for f in files),
                          "runs": known_runs(files),
                          "runs_known_files": sum(f.runs is not None for f in files),
                          "methods": method_counts(files)},
                "probe": {"files_per_folder": self.probe, "files_read": self.files_read,
                          "candidates": self.candidates, "requests": self.requests,
                          "bytes_read": self.bytes_read},
                "methods": METHODS, "notes": self.notes}

    def table(self) -> str:
        r = self.record
        head = (f"{self.source}  revision {r['revision']} = commit {r['commit']}"
                if r.get("kind") == "hub" else f"{self.source}  ({r.get('kind')} folder)")
        rows = [(d.name, str(_count(d.files)), format_bytes(d.bytes),
                 _runs_text(d.files), methods_text(d.files)) for d in self.folders]
        files = self.files
        rows.append(("total", str(_count(files)), format_bytes(sum(f.size for f in files)),
                     _runs_text(files), methods_text(files)))
        widths = [max(len(x[i]) for x in [("folder", "files", "size", "runs", "")] + rows)
                  for i in range(4)]
        lines = [head, f"files matching {self.glob!r}, by folder (depth {self.depth})",
                 f"{'folder':<{widths[0]}}  {'files':>{widths[1]}}  {'size':>{widths[2]}}"
                 f"  {'runs':>{widths[3]}}  runs from"]
        for name, n, size, runs, how in rows:
            lines.append(f"{name:<{widths[0]}}  {n:>{widths[1]}}  {size:>{widths[2]}}  "
                         f"{runs:>{widths[3]}}  {how}")
        shapes = [f"  {d.name}: {d.shape.text()}" for d in self.folders if d.shape]
        if shapes:
            lines += ["shapes:", *shapes]
        used = {m for f in files if f.runs is not None for m in [f.method]}
        if used:
            lines += ["runs from:", *(f"  {m}: {METHODS[m]}" for m in METHODS if m in used)]
        ranged = (f" by {self.requests} ranged request(s), {format_bytes(self.bytes_read)}"
                  if self.requests else "")
        if self.candidates:
            remote = "; no file downloaded" if r.get("kind") == "hub" else ""
            lines.append(f"read the headers of {self.files_read} of {self.candidates} "
                         f"candidate file(s){ranged}{remote}")
        if not files:
            lines.append(f"no files match {self.glob!r}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(files: list[FileRuns]) -> int:
    """The files of these units."""
    return sum(f.files for f in files)


def _runs_text(files: list[FileRuns]) -> str:
    runs = known_runs(files)
    return "-" if runs is None else str(runs)


def folder_of(name: str, prefix: str, depth: int) -> str:
    """The folder ``depth`` levels below ``prefix`` holding the file ``name``."""
    rel = name[len(prefix) + 1:] if prefix and name.startswith(prefix + "/") else name
    parts = rel.split("/")[:-1]
    return "/".join(parts[:depth]) or "."


def zarr_units(files: list[SourceFile], keys: tuple[str, str] = DEFAULT_KEYS
               ) -> list[SourceFile]:
    """``files`` with the metadata documents of each Zarr group's two arrays
    (``G/logits/zarr.json`` + ``G/logits_train/zarr.json``, or v2 ``.zarray``) made one
    unit (``parts``: test, train) named ``G/{logits,logits_train}/zarr.json``; sorted."""
    names = {f.name: f for f in files}
    units, taken = [], set()
    for f in files:
        for test, train in zip(metadata_names(keys[0]), metadata_names(keys[1]),
                               strict=True):
            if f.name != test and not f.name.endswith("/" + test):
                continue
            group = f.name[:len(f.name) - len(test)]
            other = names.get(group + train)
            if other is not None:
                base = test.rsplit("/", 1)[1]
                units.append(SourceFile(f"{group}{{{keys[0]},{keys[1]}}}/{base}",
                                        f.size + other.size, parts=(f, other)))
                taken |= {f.name, other.name}
    return sorted([f for f in files if f.name not in taken] + units, key=lambda f: f.name)


def list_source(spec: str | os.PathLike, *, glob: str = "**/*", depth: int = 1,
                shape: tuple[int, int, int] | None = None, probe: int | None = DEFAULT_PROBE,
                options: FetchOptions | None = None, endpoint: str | None = None,
                token: str | bool | None = None, retry_wait: float = 1.0) -> Listing:
    """List ``spec`` (a folder, a Zarr group, or ``hf://datasets/OWNER/NAME[@REV][/PATH]``)
    by folder ``depth`` levels below it, with the runs of its units in every input
    format (:class:`~kernelscale.runcount.RunCounter`), reading at most ``probe`` units
    per folder (None: all). ``shape``: (n_test, n_train,
    classes) of every file, declared (float16 unless a header says otherwise). Creates,
    downloads and deletes nothing."""
    from .formats import DEFAULT_KEYS, is_zarr_group
    from .sources.hub import HubSource
    from .sources.zarrgroup import ZarrSource

    if depth < 0:
        raise ConfigError(f"--depth must be >= 0, not {depth}")
    if probe is not None and probe < 0:
        raise ConfigError(f"--probe must be >= 0, not {probe}")
    text = os.fspath(spec)
    if is_local_spec(text) and is_zarr_group(text):
        src: Source = ZarrSource(text, DEFAULT_KEYS)
    else:
        src = open_source(text, options, endpoint=endpoint, token=token,
                          retry_wait=retry_wait)
    try:
        if isinstance(src, HubSource):
            files = [SourceFile(f.path, f.size, f.sha256) for f in src.tree(glob)]
            prefix = src.spec.prefix
        else:
            files = src.list(glob)
            prefix = ""
        declared = RunShape(*shape, "float16", "--shape") if shape is not None else None
        counter = RunCounter(src, probe)
        groups: dict[str, list[SourceFile]] = {}
        for f in files:
            groups.setdefault(folder_of(f.name, prefix, depth), []).append(f)
        folders = []
        for name in sorted(groups, key=lambda n: (n == ".", n)):
            units, problems = pair_npy(zarr_units(groups[name]), DEFAULT_KEYS)
            runs, used = counter.count(units, declared)
            for r in runs:
                if r.method == "n/a" and r.name in problems:
                    r.note = problems[r.name]
            counted = any(r.method != "n/a" for r in runs)
            folders.append(Folder(name, runs, used if counted else None))
        return Listing(str(src), src.record(glob), glob, depth, folders, probe,
                       counter.files_read, counter.candidates, counter.requests,
                       counter.bytes_read, counter.notes)
    finally:
        src.close()
