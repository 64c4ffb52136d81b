"""Job tables: values parsed on load, and the flags a table renders (for the sbatch
scripts) read back by the real command line into the same table."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.cli import _kernel_table, build_parser
from kernelscale.config import KernelTable, load_job, table_flags
from kernelscale.errors import ConfigError

pairs = st.tuples(st.integers(1, 4096), st.integers(1, 4096))
ranges = st.tuples(st.integers(0, 100), st.integers(1, 100)).map(lambda t: (t[0], t[0] + t[1]))
kernel_tables = st.builds(
    KernelTable,
    out=st.just("k"), store=st.just("s"),
    runs=st.none() | st.integers(2, 10**5),
    pairs=st.sampled_from(["test-train", "train-train", "test-test"]),
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
    precision=st.sampled_from(["fp32", "tf32"]),
    max_memory=st.none() | st.integers(1, 10**12),
    checkpoint_every=st.sampled_from([600.0, 0.5, 30.0, 3600.0]),
    tile=st.none() | pairs, chunks=st.none() | pairs,
    rows=st.none() | ranges, cols=st.none() | ranges,
    runs_per_step=st.none() | st.integers(1, 512),
    log_softmax=st.booleans(), log_softmax_fp32=st.booleans(),
    classes=st.none() | st.lists(st.integers(0, 99), min_size=1, max_size=4).map(tuple),
    overwrite=st.booleans(), restart=st.booleans())


@settings(max_examples=200, deadline=None)
@given(kernel_tables)
def test_rendered_kernel_flags_read_back_as_the_same_table(table):
    argv = ["kernel", "--store", table.store, "--out", table.out]
    for flag, value in table_flags(table, skip=("store", "out")):
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    back = _kernel_table(build_parser().parse_args(argv))
    assert back == table


def test_text_values_are_parsed_when_the_job_is_loaded(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[kernel]\nmax_memory = "40G"\ntile = "1024x4096"\nclasses = "1,3"\n'
                   '[ingest]\nshape = "10000x50000x10"\n[curve]\nruns = "10,all"\n'
                   '[slurm]\ntime = "1-12"\n')
    cfg = load_job(job)
    assert cfg.kernel.max_memory == 40 * 10**9 and cfg.kernel.tile == (1024, 4096)
    assert cfg.kernel.classes == (1, 3) and cfg.ingest.shape == (10000, 50000, 10)
    assert cfg.curve.runs == (10, "all")
    kc = cfg.kernel_config()
    assert kc.max_memory == 40 * 10**9 and kc.classes == (1, 3)
    assert dataclasses.replace(kc, tile=None).tile is None


@pytest.mark.parametrize("table, line, message", [
    ("kernel", 'max_memory = "lots"', r"\[kernel\] max_memory 'lots': cannot read it as a size"),
    ("kernel", 'tile = "12"', r"\[kernel\] tile '12': expected ROWSxCOLS"),
    ("ingest", 'shape = "10x10"', r"\[ingest\] shape '10x10': expected N_TESTxN_TRAINxCLASSES"),
    ("slurm", 'time = "4h"', r"\[slurm\] time '4h': expected a Slurm time"),
    ("curve", 'runs = "1,all"', "1 runs; a kernel needs at least 2"),
    ("kernel", "runs = \"3\"", r"\[kernel\] runs must be int, got str '3'"),
])
def test_bad_text_values_fail_on_load_naming_file_table_and_key(tmp_path, table, line,
                                                                 message):
    job = tmp_path / "job.toml"
    job.write_text(f"[{table}]\n{line}\n[evaluate]\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_job(job)
    assert str(e.value).startswith(str(job))
