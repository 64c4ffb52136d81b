"""Pairs of ``.npy`` files, one per split, made one unit of any source.

A ``.npy`` holds one array, so a file per split is paired by name: the file name less
``.npy`` ends in one of the two keys (``--keys``, default ``logits``, ``logits_train``),
after a ``.`` or as the whole name, and the rest (folder and prefix) is shared::

    runs/chunk03.logits.npy  +  runs/chunk03.logits_train.npy
    runs/c04/logits.npy      +  runs/c04/logits_train.npy

The pair's manifest name lists both: ``runs/chunk03.{logits,logits_train}.npy``. A
``.npy`` without its partner, or named by neither key, is refused before anything is
fetched. Other files pass through unchanged. :class:`PairedSource` wraps a source: the
two files are fetched (downloaded) together and released together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from .base import Fetched, Source, SourceFile


def npy_key(name: str, keys: tuple[str, str]) -> tuple[str, str] | None:
    """(prefix, key) of a ``.npy`` name following the convention, else None."""
    if not name.endswith(".npy"):
        return None
    stem = name[:-4]
    for key in sorted(keys, key=len, reverse=True):
        base = stem.rsplit("/", 1)[-1]
        if base == key or stem.endswith("." + key):
            return stem[:len(stem) - len(key)], key
    return None


def pair_name(prefix: str, keys: tuple[str, str]) -> str:
    return f"{prefix}{{{keys[0]},{keys[1]}}}.npy"


def pair_npy(files: list[SourceFile], keys: tuple[str, str]
             ) -> tuple[list[SourceFile], dict[str, str]]:
    """``files`` with their ``.npy`` files paired by name into one unit each (``parts``:
    the test and the train file), sorted by name; and why each ``.npy`` left unpaired
    (no partner, or named by neither key) cannot be ingested, by its name."""
    out: list[SourceFile] = []
    problems: dict[str, str] = {}
    groups: dict[str, dict[str, SourceFile]] = {}
    for f in files:
        if not f.name.endswith(".npy"):
            out.append(f)
            continue
        pk = npy_key(f.name, keys)
        if pk is None:
            problems[f.name] = (f"a .npy holds one split: name it PREFIX.{keys[0]}.npy or "
                                f"PREFIX.{keys[1]}.npy (see --keys)")
            out.append(f)
            continue
        groups.setdefault(pk[0], {})[pk[1]] = f
    for prefix, got in groups.items():
        if len(got) == 1:
            (key, f), = got.items()
            other = keys[1] if key == keys[0] else keys[0]
            problems[f.name] = (f"no {prefix.rsplit('/', 1)[-1]}{other}.npy beside it: a "
                                ".npy holds one split, paired by name")
            out.append(f)
            continue
        test, train = got[keys[0]], got[keys[1]]
        out.append(SourceFile(pair_name(prefix, keys), test.size + train.size,
                              parts=(test, train)))
    return sorted(out, key=lambda f: f.name), problems


@dataclasses.dataclass
class _PairFetched(Fetched):
    members: list[Fetched] = dataclasses.field(default_factory=list)


class PairedSource(Source):
    """``inner``'s files with its ``.npy`` files grouped into (test, train) pairs."""

    def __init__(self, inner: Source, keys: tuple[str, str]) -> None:
        self.inner = inner
        self.keys = keys
        self.kind = inner.kind
        self._problems: dict[str, str] = {}

    def __str__(self) -> str:
        return str(self.inner)

    def __getattr__(self, name: str):
        # what only some sources have (bytes_downloaded of the Hub's) is the inner one's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def list(self, glob: str) -> list[SourceFile]:
        out, problems = pair_npy(self.inner.list(glob), self.keys)
        self._problems.update(problems)
        return out

    def name_problem(self, file: SourceFile) -> str | None:
        for f in file.parts or (file,):
            why = self.inner.name_problem(f)
            if why:
                return why
        return self._problems.get(file.name)

    def fetch(self, files: Iterable[SourceFile]) -> Iterator[Fetched]:
        files = list(files)
        inner = self.inner.fetch(p for f in files for p in (f.parts or (f,)))
        try:
            for f in files:
                if not f.parts:
                    yield next(inner)
                    continue
                got = [next(inner) for _ in f.parts]
                parts = tuple(dataclasses.replace(p, path=g.path)
                              for p, g in zip(f.parts, got, strict=True))
                yield _PairFetched(dataclasses.replace(f, parts=parts), got[0].path,
                                   members=got)
            # run the inner one to its end: closed while at its last file, it would take
            # back files still in use (as when the consumer stops early)
            for extra in inner:
                raise RuntimeError(f"{self.inner} fetched more than asked: {extra.file.name}")
        finally:
            inner.close()

    def release(self, item: Fetched, bad: bool = False) -> None:
        if item.released:
            return
        for m in getattr(item, "members", None) or [item]:
            self.inner.release(m, bad)
        item.released = True

    def label(self, name: str) -> str:
        return self.inner.label(name)

    def open_lazy(self, file: SourceFile):
        if file.parts:
            raise NotImplementedError
        return self.inner.open_lazy(file)

    def record(self, glob: str) -> dict:
        return self.inner.record(glob)

    def entry(self, file: SourceFile) -> dict:
        """The inner source's fields, those the two files share (e.g. the commit)."""
        if not file.parts:
            return self.inner.entry(file)
        a, b = (self.inner.entry(p) for p in file.parts)
        return {k: v for k, v in a.items() if b.get(k) == v}

    def close(self) -> None:
        self.inner.close()
