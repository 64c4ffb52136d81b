"""Planning Slurm jobs before the store exists (kernelscale/slurm/geometry.py): the shape
and runs of a local source in every input format, from the files' headers; no cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernelscale.config import load_job, slurm_settings
from kernelscale.errors import ConfigError
from kernelscale.slurm.geometry import count_source, ingest_state, plan_array
from tests.test_formats import WRITERS, write_group, write_units

N_TEST, N_TRAIN, C = 12, 20, 3
RUNS = [2, 3, 4]


def units(dtype=np.float16):
    rng = np.random.default_rng(5)
    return [(Path(f"u{i}"), rng.normal(size=(r, N_TEST, C)).astype(dtype),
             rng.normal(size=(r, N_TRAIN, C)).astype(dtype)) for i, r in enumerate(RUNS)]


def job(tmp_path: Path, source: Path, glob: str, extra: str = "") -> Path:
    p = tmp_path / "job.toml"
    p.write_text(f'[job]\nname = "plan"\nworkdir = "{tmp_path / "wd"}"\n'
                 f'[ingest]\nsource = "{source}"\nstore = "store"\nglob = "{glob}"\n{extra}'
                 '[kernel]\ndevice = "cpu"\nchunks = "4x8"\n')
    return p


@pytest.mark.parametrize("kind", ["logpt", *WRITERS, "zarr"])
def test_the_plan_reads_the_shape_of_every_format(tmp_path, kind):
    from tests.reference import write_log

    src = tmp_path / "src"
    us = units(np.float32 if kind == "safetensors" else np.float16)
    if kind == "logpt":
        for rel, te, tr in us:
            write_log(src / rel / "log.pt", te, tr)
        glob = "**/log.pt"
    elif kind == "zarr":
        src = write_group(tmp_path / "g.zarr", np.concatenate([u[1] for u in us]),
                          np.concatenate([u[2] for u in us]), run_chunk=2)
        glob = "**/*"
    else:
        writer, glob, _, _ = WRITERS[kind]
        write_units(src, us, writer)
    cfg = load_job(job(tmp_path, src, glob))
    counted = count_source(cfg)
    assert counted.shape is not None and counted.shape.dims == (N_TEST, N_TRAIN, C)
    assert counted.shape.dtype == ("float32" if kind == "safetensors" else "float16")
    assert counted.runs() == sum(RUNS) and not counted.notes
    kp = plan_array(cfg, slurm_settings(cfg), need_ingest=True)
    assert kp.geometry_from == "source" and kp.shape == (N_TEST, N_TRAIN)
    # the units are the names an ingest records: none is in the (missing) store yet
    state = ingest_state(cfg)
    assert state.needed and state.files_total == (1 if kind == "zarr" else len(RUNS))


def test_max_runs_and_an_unreadable_source(tmp_path):
    src = write_units(tmp_path / "src", units(), WRITERS["npz"][0])
    cfg = load_job(job(tmp_path, src, "**/*.npz", "max_runs = 4\n"))
    assert count_source(cfg).runs(cfg.ingest.max_runs) == 4
    for f in src.rglob("*.npz"):
        f.write_bytes(b"not an npz at all")
    cfg = load_job(job(tmp_path, src, "**/*.npz"))
    with pytest.raises(ConfigError, match=r"cannot read the shape of any source file .*"
                       r"u0/chunk.npz.*\[ingest\] shape"):
        plan_array(cfg, slurm_settings(cfg), need_ingest=True)
