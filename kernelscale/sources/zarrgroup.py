"""A local Zarr group of logits arrays as a source: SOURCE is the group itself.

Its units are blocks of runs (:func:`kernelscale.formats.zarr_io.block_runs`), named
``GROUP[runs START:STOP]`` after the group's folder name; ``--glob`` does not apply. The
arrays' shapes and dtypes are checked when the source is listed, each block's data when
it is converted (:func:`kernelscale.formats.zarr_io.read_block`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ConfigError
from ..formats.sniff import is_zarr_group
from ..formats.zarr_io import block_runs, blocks, logical_bytes, open_arrays
from .base import Fetched, Source, SourceFile, is_local_spec


class ZarrSource(Source):
    """The runs of the arrays ``keys`` (test, train) of the Zarr group at ``root``."""

    kind = "zarr"

    def __init__(self, root: str | os.PathLike, keys: tuple[str, str]) -> None:
        if not is_local_spec(root):
            raise ConfigError(f"{root}: a Zarr source must be a local folder")
        self.root = Path(root)
        self.keys = keys

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def can_open(cls, spec: str) -> bool:
        return is_local_spec(spec) and is_zarr_group(spec)

    def list(self, glob: str = "") -> list[SourceFile]:
        if not is_zarr_group(self.root):
            raise ConfigError(f"{self.root}: not a Zarr group (no zarr.json or .zgroup)")
        test, train = open_arrays(self.root, self.keys, str(self.root))
        per = block_runs(test, train)
        return [SourceFile(f"{self.root.resolve().name}[runs {a}:{b}]", logical_bytes(test, train, a, b),
                           path=self.root, runs=(a, b))
                for a, b in blocks(int(test.shape[0]), per)]

    def array_shape(self) -> tuple[int, int, int, str]:
        """(n_test, n_train, classes, dtype) of the group's arrays."""
        test, train = open_arrays(self.root, self.keys, str(self.root))
        return (int(test.shape[1]), int(train.shape[1]), int(test.shape[2]),
                str(test.dtype))

    def fetch(self, files: Iterable[SourceFile]) -> Iterator[Fetched]:
        for f in files:
            yield Fetched(f, self.root)

    def record(self, glob: str) -> dict:
        return {"kind": self.kind, "path": str(self.root.resolve()), "keys": list(self.keys)}

    def entry(self, file: SourceFile) -> dict:
        return {"source_runs": list(file.runs)} if file.runs else {}
