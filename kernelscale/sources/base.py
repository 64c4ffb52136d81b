"""The interface every source of logits files implements (see :mod:`kernelscale.sources`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar


@dataclass(frozen=True)
class SourceFile:
    """One unit of a source, ingested as one manifest entry: usually a file, with its
    manifest name, size and, when the listing says, sha256.

    Two kinds of unit are not one file: a pair of ``.npy`` files, one per split
    (``parts``: the test file's and the train file's entries; see
    :mod:`kernelscale.sources.pairs`), and a block of runs of a Zarr group (``runs``;
    see :mod:`kernelscale.sources.zarrgroup`).
    """

    name: str  #: stable name recorded in the manifest (path inside the source)
    size: int  #: bytes (of all parts; of a block's logits)
    sha256: str | None = None  #: expected content hash (the Hub's LFS sha256), if known
    path: Path | None = None  #: local path, for sources that already hold the file
    parts: tuple[SourceFile, ...] = ()  #: (test, train) files of a pair of .npy files
    runs: tuple[int, int] | None = None  #: runs [start, stop) of an array source's block


@dataclass
class Fetched:
    """A file of a source available at a local ``path`` until it is released."""

    file: SourceFile
    path: Path
    released: bool = False


@dataclass(frozen=True)
class FetchOptions:
    """How a remote source downloads (ignored by local folders)."""

    revision: str | None = None  #: branch, tag or commit (default: the source's main)
    download_workers: int = 4  #: files downloaded ahead at once
    retries: int = 5  #: retries per request on transient errors
    keep_downloads: bool = False  #: keep downloaded files after they are ingested
    cache_dir: str | os.PathLike | None = None  #: download cache


class Source:
    """The interface of a source of ``log.pt`` files."""

    #: what ``kind`` the manifest's ``sources`` entries record
    kind: ClassVar[str] = ""

    @classmethod
    def can_open(cls, spec: str) -> bool:
        """Whether ``spec`` names a source of this kind."""
        raise NotImplementedError

    def list(self, glob: str) -> list[SourceFile]:
        """The files matching ``glob``, sorted by name."""
        raise NotImplementedError

    def fetch(self, files: Iterable[SourceFile]) -> Iterator[Fetched]:
        """Make ``files`` available locally, in order; each until :meth:`release`."""
        raise NotImplementedError

    def label(self, name: str) -> str:
        """How the file ``name`` of this source is named in messages."""
        return f"{self}/{name}"

    def open_lazy(self, file: SourceFile) -> BinaryIO:
        """``file`` as a seekable binary file whose bytes are read when asked for (a
        remote source: by ranged requests), to read a header without fetching the file.
        Raises NotImplementedError where the source cannot."""
        raise NotImplementedError

    def release(self, item: Fetched, bad: bool = False) -> None:
        """The consumer is done with ``item`` (``bad``: it was rejected)."""
        item.released = True

    def name_problem(self, file: SourceFile) -> str | None:
        """Why ``file``'s name cannot be fetched safely (e.g. a '..' path segment that
        would leave the download folder), or None."""
        parts = file.name.replace("\\", "/").split("/")
        if file.name.startswith("/") or ".." in parts:
            return "unsafe path (absolute or with a '..' segment); not downloaded"
        return None

    def record(self, glob: str) -> dict:
        """The manifest's ``sources`` entry of an ingest from this source."""
        raise NotImplementedError

    def entry(self, file: SourceFile) -> dict:
        """Extra manifest fields of one ingested file (e.g. the commit it came from)."""
        return {}

    def close(self) -> None:
        """Stop work ahead; delete what was fetched and not released."""


def is_local_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is a local path (no ``scheme://``), resolved like any other path."""
    return "://" not in str(spec)
