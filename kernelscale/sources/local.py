"""A local directory of ``log.pt`` files (any path without a ``scheme://``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import BadInputError
from .base import Fetched, Source, SourceFile, is_local_spec


class LocalSource(Source):
    """Every file under ``root`` matching a glob; fetching is reading in place."""

    kind = "local"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def can_open(cls, spec: str) -> bool:
        return is_local_spec(spec)

    def list(self, glob: str = "**/log.pt") -> list[SourceFile]:
        if not self.root.is_dir():
            raise BadInputError(f"{self.root}: source is not a directory")
        files = sorted(p for p in self.root.glob(glob) if p.is_file())
        return [SourceFile(p.relative_to(self.root).as_posix(), p.stat().st_size, path=p)
                for p in files]

    def fetch(self, files: Iterable[SourceFile]) -> Iterator[Fetched]:
        for f in files:
            yield Fetched(f, f.path if f.path is not None else self.root / f.name)

    def open_lazy(self, file: SourceFile) -> BinaryIO:
        return open(file.path if file.path is not None else self.root / file.name, "rb")

    def record(self, glob: str) -> dict:
        return {"kind": self.kind, "path": str(self.root.resolve())}
