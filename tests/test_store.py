import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelscale.errors import StoreError
from kernelscale.store import Store
from tests.conftest import ingest_dir
from tests.reference import write_log


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_into_equals_the_source_runs(small_store, data):
    store, test, train = small_store
    s = Store.open(store)
    split, ref = data.draw(st.sampled_from([("test", test), ("train", train)]))
    a = data.draw(st.integers(0, s.runs))
    b = data.draw(st.integers(a, s.runs))
    out = np.full((b - a, *ref.shape[1:]), np.nan, dtype=np.float16)
    s.read_into(split, a, b, out)
    np.testing.assert_array_equal(out, ref[a:b])
    np.testing.assert_array_equal(out, s.read(split, a, b))


def test_read_into_unwritten_chunk_reads_zeros(tmp_path):
    """Zarr does not write a chunk equal to the fill value; it must read back as zeros."""
    rng = np.random.default_rng(0)
    te = rng.normal(size=(8, 6, 3))
    tr = rng.normal(size=(8, 9, 3))
    te[4:8] = 0.0  # the second run-chunk of the test split is all fill value
    write_log(tmp_path / "src" / "a" / "log.pt", te, tr)
    ingest_dir(tmp_path / "src", tmp_path / "store", run_chunk=4, show_progress=False)
    s = Store.open(tmp_path / "store")
    out = np.ones((8, 6, 3), dtype=np.float16)
    s.read_into("test", 0, 8, out)
    np.testing.assert_array_equal(out, te.astype(np.float16))


def test_read_into_checks_its_arguments(small_store):
    s = Store.open(small_store[0])
    with pytest.raises(StoreError, match="outside"):
        s.read_into("test", 0, 25, np.empty((25, 40, 5), np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.read_into("test", 0, 2, np.empty((2, 40, 5), np.float32))


def test_store_files_are_readable_by_others(small_store):
    import stat

    s = Store.open(small_store[0])
    for p in [s.root / "manifest.json", *(s.root / "logits").rglob("c/*/0/0")]:
        assert p.stat().st_mode & stat.S_IRGRP, p
