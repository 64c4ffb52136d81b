import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelscale import store_layout
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


@pytest.mark.fault
def test_a_creation_that_fails_half_way_leaves_nothing_at_the_path(tmp_path, monkeypatch):
    def half(root, *a):
        (root / "zarr.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_layout, "build_store", half)
    with pytest.raises(OSError):
        Store.create(tmp_path / "s", n_test=3, n_train=4, classes=2, dtype="float16")
    assert not (tmp_path / "s").exists()
    assert not list(tmp_path.glob(".s.creating-*"))


@pytest.mark.fault
def test_the_loser_of_two_racing_creations_is_told(tmp_path, monkeypatch):
    build = store_layout.build_store

    def racing(root, *a):
        build(root, *a)
        # the other process: creates the store while this one is still building
        monkeypatch.setattr(store_layout, "build_store", build)
        Store.create(tmp_path / "s", n_test=3, n_train=4, classes=2, dtype="float16")

    monkeypatch.setattr(store_layout, "build_store", racing)
    with pytest.raises(StoreError, match="created by another process at the same time"):
        Store.create(tmp_path / "s", n_test=3, n_train=4, classes=2, dtype="float16")
    assert Store.open(tmp_path / "s").runs == 0
    assert not list(tmp_path.glob(".s.creating-*"))


@pytest.mark.fault
def test_a_killed_creation_is_swept_and_the_store_created(tmp_path):
    import os
    import time

    stale = tmp_path / ".s.creating-abc123"
    (stale / "logits").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    Store.create(tmp_path / "s", n_test=3, n_train=4, classes=2, dtype="float16")
    assert not stale.exists() and Store.exists(tmp_path / "s")


@pytest.mark.fault
def test_a_reader_keeps_its_statistics_while_an_ingest_appends(tmp_path):
    from tests.reference import random_source

    src = tmp_path / "src"
    random_source(src, [5, 6, 7, 8])
    files = sorted(src.rglob("log.pt"))
    ingest_dir(src, tmp_path / "s", max_files=1, show_progress=False)
    reader = Store.open(tmp_path / "s")  # opened at 5 runs, statistics not read yet
    want = Store.open(tmp_path / "s").stats("train").mean.copy()
    ingest_dir(src, tmp_path / "s", max_files=2, show_progress=False)  # one commit later
    st = reader.stats("train")
    assert st.count == 5
    np.testing.assert_array_equal(st.mean, want)
    late = Store.open(tmp_path / "s")
    ingest_dir(src, tmp_path / "s", max_files=4, show_progress=False)  # two more commits
    with pytest.raises(StoreError, match="changed while being read"):
        late.stats("test")
    assert len(files) == 4


def test_two_writers_taking_turns_keep_every_run_and_its_statistics(tmp_path):
    """A Store object keeps what it committed (the statistics, the resized arrays) for
    its next commit; a commit by another writer in between must be seen, not
    overwritten with what the first one knew."""
    from kernelscale.stats import stats_of_logits
    from tests.reference import log_softmax_exact64

    rng = np.random.default_rng(3)
    files = [(rng.normal(size=(r, 6, 4)) * 3, rng.normal(size=(r, 9, 4)) * 3)
             for r in (3, 5, 4, 6, 2)]
    files = [(te.astype(np.float16), tr.astype(np.float16)) for te, tr in files]
    path = tmp_path / "s"
    Store.create(path, n_test=6, n_train=9, classes=4, dtype="float16", run_chunk=4)
    a, b = Store.open(path, mode="a"), Store.open(path, mode="a")
    for i, (who, (te, tr)) in enumerate(zip([a, b, a, a, b], files, strict=True)):
        with who.writer():
            who.commit_file({"name": f"f{i}", "sha256": f"{i:064d}"}, te, tr,
                            {"test": stats_of_logits(te), "train": stats_of_logits(tr)})
    test = np.concatenate([te for te, _ in files])
    train = np.concatenate([tr for _, tr in files])
    final = Store.open(path)
    assert final.runs == len(test) == 20
    assert final.array("test").shape == test.shape and final.array("train").shape == train.shape
    np.testing.assert_array_equal(final.read("test", 0, 20), test)
    np.testing.assert_array_equal(final.read("train", 0, 20), train)
    for split, x in (("test", test), ("train", train)):
        v = log_softmax_exact64(x)
        for rs in (final.stats(split), b.stats(split)):
            assert rs.count == 20
            np.testing.assert_allclose(rs.mean, v.mean(axis=0), rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(rs.std(), v.std(axis=0, ddof=1), rtol=1e-6)


@pytest.mark.fault
def test_what_a_failed_writer_left_is_dropped_by_the_next_commit(tmp_path):
    """Another writer between two commits of one Store object grows the arrays, writes
    chunks, then fails before its commit: the next commit of the first object drops
    what it left (chunks past the committed runs), as a fresh writer would."""
    from kernelscale.stats import stats_of_logits

    rng = np.random.default_rng(5)

    def log(runs):
        return tuple(rng.normal(size=(runs, n, 3)).astype(np.float16) for n in (5, 7))

    def commit(store, name, te, tr, fail=False):
        def refuse():
            raise RuntimeError("source changed")
        with store.writer():
            store.commit_file({"name": name, "sha256": name * 64}, te, tr,
                              {"test": stats_of_logits(te), "train": stats_of_logits(tr)},
                              before_commit=refuse if fail else None)

    path = tmp_path / "s"
    Store.create(path, n_test=5, n_train=7, classes=3, dtype="float16", run_chunk=4)
    a, b = Store.open(path, mode="a"), Store.open(path, mode="a")
    first, second = log(4), log(4)
    commit(a, "a", *first)
    with pytest.raises(RuntimeError, match="source changed"):
        commit(b, "b", *log(8), fail=True)  # runs 4..12 written, never committed
    assert (path / "logits" / "train" / "c" / "2" / "0" / "0").exists()
    commit(a, "c", *second)
    final = Store.open(path)
    assert final.runs == 8 and final.array("train").shape == (8, 7, 3)
    for split in ("test", "train"):
        assert not (path / "logits" / split / "c" / "2" / "0" / "0").exists(), split
    np.testing.assert_array_equal(final.read("train", 0, 8),
                                  np.concatenate([first[1], second[1]]))


def test_every_file_a_commit_writes_is_fsynced_before_the_manifest_names_it(
        tmp_path, monkeypatch):
    """The metadata written beside the chunk bytes (the arrays' new extent, the next
    statistics generation) is synced together at the end; all of it, the chunk files and
    their folders are durable before the manifest is replaced."""
    import os

    from tests.reference import random_source

    random_source(tmp_path / "src", [4, 4], n_test=10, n_train=20)
    synced: set[str] = set()
    events: list = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if os.path.realpath(src) in synced:  # fsynced as a temp file, then renamed
            synced.add(os.path.realpath(dst))
        if str(dst).endswith("manifest.json"):
            events.append(set(synced))

    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False,
               glob="**/file000/log.pt")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    before = {str(p) for p in (tmp_path / "store").rglob("*")}
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    monkeypatch.undo()
    written = [p for p in (tmp_path / "store").rglob("*") if p.is_file()
               and str(p) not in before and p.name != "manifest.json"]
    written += [tmp_path / "store" / "logits" / s / "zarr.json" for s in ("test", "train")]
    assert len(events) == 1 and any("stats" in str(p) for p in written)
    assert any("logits" in str(p) and "/c/" in str(p) for p in written)
    missing = [str(q) for p in written for q in (p, p.parent)
               if os.path.realpath(q) not in events[0]]
    assert not missing, missing
