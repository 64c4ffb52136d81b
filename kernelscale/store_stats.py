"""A store's statistics generations: read one, write the next, sweep the stale ones.

Generation ``g<k>`` (``STORE/stats/g<k>/<split>_mean`` and ``<split>_m2``, float64
(examples, classes)) holds the running statistics of the runs committed with it; the
manifest names the current one. A commit writes the next generation before the manifest
points at it, and keeps the previous one for readers that opened the store before.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import zarr
from zarr.codecs import Crc32cCodec

from .errors import StoreError
from .stats import RunningStats
from .store_layout import SPLITS


def read_generation(root: Path, group: zarr.Group, gen: int, split: str,
                    runs: int) -> RunningStats:
    """The statistics of ``runs`` runs that generation ``gen`` (>= 1) holds for
    ``split``; a generation gone (removed by two later commits) or damaged is a
    :class:`StoreError` saying what to do."""
    try:
        sg = group["stats"][f"g{gen}"]
        return RunningStats(runs, sg[f"{split}_mean"][...], sg[f"{split}_m2"][...])
    except (KeyError, ValueError) as e:  # a missing array, a bad checksum
        if not (root / "stats" / f"g{gen}").is_dir():
            raise StoreError(f"{root}: changed while being read (a concurrent ingest "
                             "committed twice); re-run") from None
        raise StoreError(f"{root}/stats/g{gen}/{split}_*: unreadable "
                         f"({str(e).splitlines()[0][:100]}); recompute with "
                         f"`kernelscale verify {root} --repair SOURCE`") from None


def write_generation(group: zarr.Group, gen: int, stats: dict[str, RunningStats]) -> str:
    """Write generation ``gen`` of the statistics ``stats`` (split -> float64
    (examples, classes) mean and m2), replacing any leftover of that number; return the
    sha256 of their bytes (the manifest's ``stats_sha256``)."""
    sg = group["stats"].create_group(f"g{gen}", overwrite=True)
    digest = hashlib.sha256()
    for split in SPLITS:
        st = stats[split]
        for name, val in (("mean", st.mean), ("m2", st.m2)):
            sg.create_array(f"{split}_{name}", data=val, chunks=val.shape,
                            compressors=[Crc32cCodec()], dimension_names=(split, "class"))
            digest.update(val.tobytes())
    return digest.hexdigest()


def sweep_generations(root: Path, gen: int) -> None:
    """Remove every generation but ``gen`` and the one before it (a crashed writer's
    uncommitted one, or one two commits old)."""
    keep = {f"g{gen}", f"g{gen - 1}"}
    sdir = root / "stats"
    if sdir.is_dir():
        for child in sdir.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)


def drop_generation(root: Path, gen: int) -> None:
    """Remove generation ``gen``, if it is there."""
    shutil.rmtree(root / "stats" / f"g{gen}", ignore_errors=True)
