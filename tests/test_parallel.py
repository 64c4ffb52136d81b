"""Dask ingest: several files validated at once, committed in order by one writer."""

import numpy as np
import pytest

from kernelscale.errors import BadInputError
from kernelscale.parallel import dask_client, dask_preparer, parallel_preparer
from kernelscale.store import Store
from tests.conftest import ingest_dir, run_cli
from tests.reference import random_source, write_log
from tests.test_ingestion import assert_same_store


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    """Seven files, large ones first, so workers finish later files before earlier ones."""
    d = tmp_path_factory.mktemp("par")
    runs = [40, 30, 2, 1, 3, 1, 2]
    random_source(d / "src", runs, n_test=200, n_train=900, classes=10, seed=21)
    ingest_dir(d / "src", d / "serial", show_progress=False)
    return d


@pytest.fixture(scope="module")
def client():
    with dask_client(2, None) as c:
        yield c


def test_two_dask_workers_give_the_serial_store(mixed_source, tmp_path):
    d = mixed_source
    with parallel_preparer(2) as prep:
        assert prep is not None
        summary = ingest_dir(d / "src", tmp_path / "dask", show_progress=False,
                               preparer=prep)
    assert summary.files_ingested == 7 and summary.runs_total == 79
    assert_same_store(d / "serial", tmp_path / "dask")


def test_dask_ingest_extends_a_store_and_stops_at_a_bad_file_in_order(mixed_source, client,
                                                                     tmp_path):
    """Files after a bad one are prepared ahead by workers but never committed."""
    d = mixed_source
    src = tmp_path / "src"
    import shutil

    shutil.copytree(d / "src", src)
    store = tmp_path / "store"
    files = sorted(src.glob("**/log.pt"))
    # the first three files make the store; then a bad file sorts between the rest
    for f in files[3:]:
        f.rename(f.with_suffix(".later"))
    ingest_dir(src, store, show_progress=False)
    for f in files[3:]:
        f.with_suffix(".later").rename(f)
    bad = src / "logs_saveoutputs_main" / "file004a" / "log.pt"
    bad.parent.mkdir()
    bad.write_text("junk")
    prep = dask_preparer(client, 3)
    with pytest.raises(BadInputError, match="file004a"):
        ingest_dir(src, store, show_progress=False, preparer=prep)
    names = [f["name"] for f in Store.open(store).manifest["files"]]
    assert names == [f"logs_saveoutputs_main/file{i:03d}/log.pt" for i in range(5)]
    # with --skip-bad the rest follows and the bad one is recorded
    summary = ingest_dir(src, store, show_progress=False, preparer=prep, skip_bad=True)
    assert summary.files_rejected == 1 and "file004a" in summary.errors[0]
    s = Store.open(store)
    assert [r["name"] for r in s.manifest["rejected"]] == [
        "logs_saveoutputs_main/file004a/log.pt"]
    bad.unlink()
    ref = Store.open(d / "serial")
    assert s.runs == ref.runs
    np.testing.assert_array_equal(s.read("train", 0, s.runs), ref.read("train", 0, ref.runs))
    np.testing.assert_array_equal(s.stats("test").m2, ref.stats("test").m2)


def test_workers_must_be_positive(tmp_path):
    write_log(tmp_path / "src" / "a" / "log.pt", np.zeros((2, 4, 3)), np.zeros((2, 5, 3)))
    p = run_cli("ingest", str(tmp_path / "src"), "--store", str(tmp_path / "s"), "--workers",
                "0", check=False)
    assert p.returncode == 2 and "--workers must be >= 1" in p.stderr
