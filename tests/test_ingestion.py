import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelscale.errors import BadInputError
from kernelscale.ingestion import DuplicateFileWarning, IngestSummary
from kernelscale.stats import LOG1P32
from kernelscale.store import Store
from tests.conftest import ROOT, ingest_dir, run_cli
from tests.reference import log_softmax_exact64, random_source, write_log


def store_snapshot(path):
    """Logical content of a store: committed logits, statistics, manifest minus times."""
    s = Store.open(path)
    m = json.loads(json.dumps(s.manifest))
    for f in m["files"]:
        f.pop("ingested_at", None)
    return {"manifest": m,
            "test": s.read("test", 0, s.runs), "train": s.read("train", 0, s.runs),
            "stats": {sp: (s.stats(sp).mean, s.stats(sp).m2) for sp in ("test", "train")}}


def assert_same_store(a, b):
    sa, sb = store_snapshot(a), store_snapshot(b)
    ma, mb = sa["manifest"], sb["manifest"]
    for m in (ma, mb):
        m.pop("sources")
    assert ma == mb
    np.testing.assert_array_equal(sa["test"], sb["test"])
    np.testing.assert_array_equal(sa["train"], sb["train"])
    for sp in ("test", "train"):
        for x, y in zip(sa["stats"][sp], sb["stats"][sp], strict=True):
            np.testing.assert_array_equal(x, y)


def test_store_holds_all_runs_and_statistics(small_store):
    store, test, train = small_store
    s = Store.open(store)
    assert s.runs == 24
    assert [(f["run_start"], f["run_stop"]) for f in s.manifest["files"]] == [(0, 7), (7, 15),
                                                                              (15, 24)]
    np.testing.assert_array_equal(s.read("test", 0, 24), test)
    np.testing.assert_array_equal(s.read("train", 0, 24), train)
    assert s.array("test").chunks[0] == 4
    assert s.transform == LOG1P32
    for split, x in (("test", test), ("train", train)):
        ls = log_softmax_exact64(x)
        st = s.stats(split)
        assert st.count == 24
        np.testing.assert_allclose(st.mean, ls.mean(0), rtol=1e-6, atol=0)
        np.testing.assert_allclose(st.std(), ls.std(0, ddof=1), rtol=1e-6, atol=0)


def test_merged_statistics_do_not_depend_on_file_split(tmp_path):
    """Same runs, cut into files differently: statistics agree to float64 rounding."""
    test, train = random_source(tmp_path / "a", [24], seed=5)
    ingest_dir(tmp_path / "a", tmp_path / "sa", show_progress=False)
    for i, (s, e) in enumerate(((0, 5), (5, 6), (6, 24))):
        write_log(tmp_path / "b" / f"f{i}" / "log.pt", test[s:e], train[s:e])
    ingest_dir(tmp_path / "b", tmp_path / "sb", show_progress=False)
    a, b = Store.open(tmp_path / "sa"), Store.open(tmp_path / "sb")
    for split in ("test", "train"):
        np.testing.assert_allclose(a.stats(split).mean, b.stats(split).mean, rtol=0, atol=1e-13)
        np.testing.assert_allclose(a.stats(split).m2, b.stats(split).m2, rtol=1e-12, atol=1e-12)


def test_rerun_is_idempotent_and_extends(small_source, tmp_path):
    src, test, train = small_source
    store = tmp_path / "store"
    s1 = ingest_dir(src, store, show_progress=False)
    s2 = ingest_dir(src, store, show_progress=False)
    assert (s1.files_ingested, s2.files_ingested, s2.files_skipped) == (3, 0, 3)
    rng = np.random.default_rng(1)
    write_log(src / "logs_saveoutputs_main" / "zzz" / "log.pt",
              rng.normal(size=(2, 40, 5)), rng.normal(size=(2, 96, 5)))
    s3 = ingest_dir(src, store, show_progress=False)
    assert s3.files_ingested == 1 and Store.open(store).runs == 26


def test_duplicate_content_is_skipped_with_warning(small_source, tmp_path):
    src, *_ = small_source
    store = tmp_path / "store"
    ingest_dir(src, store, show_progress=False)
    dup = src / "logs_saveoutputs_main" / "zcopy" / "log.pt"
    dup.parent.mkdir()
    shutil.copy(src / "logs_saveoutputs_main" / "file000" / "log.pt", dup)
    with pytest.warns(DuplicateFileWarning, match="same sha256"):
        s = ingest_dir(src, store, show_progress=False)
    assert s.files_ingested == 0 and Store.open(store).runs == 24


# --------------------------------------------------------------------------- bad input

def _good(rng, runs=3, n_test=40, n_train=96, c=5):
    return rng.normal(size=(runs, n_test, c)), rng.normal(size=(runs, n_train, c))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kernelscale-pwned",))


def _bad_files():
    rng = np.random.default_rng(0)

    def missing_key(p):
        torch.save({"logits": torch.zeros(3, 40, 5, dtype=torch.float16)}, p)

    def wrong_examples(p):
        te, tr = _good(rng, n_test=41)
        write_log(p, te, tr)

    def wrong_classes(p):
        te, tr = _good(rng, c=6)
        write_log(p, te, tr)

    def run_mismatch(p):
        te, _ = _good(rng)
        _, tr = _good(rng, runs=4)
        write_log(p, te, tr)

    def nonfinite(p):
        te, tr = _good(rng)
        te[1, 2, 3] = np.nan
        write_log(p, te, tr)

    def truncated(p):
        te, tr = _good(rng)
        write_log(p, te, tr)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def not_torch(p):
        p.write_text("this is not a torch file\n")

    def evil_pickle(p):
        torch.save({"logits": torch.zeros(3, 40, 5, dtype=torch.float16),
                    "logits_train": torch.zeros(3, 96, 5, dtype=torch.float16),
                    "code": Evil()}, p, pickle_protocol=2)

    def plain_pickle(p):
        with open(p, "wb") as fh:
            pickle.dump(Evil(), fh)

    return {"missing key": (missing_key, "missing key"),
            "wrong examples": (wrong_examples, "41 test examples, but the store holds 40"),
            "wrong classes": (wrong_classes, "6 classes, but the store holds 5"),
            "run mismatch": (run_mismatch, "3 runs but 'logits_train' has 4"),
            "non-finite": (nonfinite, "non-finite"),
            "truncated": (truncated, "not a readable torch file"),
            "not torch": (not_torch, "not a torch file"),
            "evil pickle": (evil_pickle, "refused"),
            "plain pickle": (plain_pickle, "")}


@pytest.mark.fault
@pytest.mark.parametrize("case", list(_bad_files()))
def test_bad_file_is_refused_and_store_unchanged(small_store, case, tmp_path):
    store, *_ = small_store
    before = store_snapshot(store)
    maker, message = _bad_files()[case]
    bad = tmp_path / "bad" / "x" / "log.pt"
    bad.parent.mkdir(parents=True)
    marker = Path("/tmp/kernelscale-pwned")
    marker.unlink(missing_ok=True)
    maker(bad)
    p = run_cli("ingest", str(tmp_path / "bad"), "--store", str(store), check=False)
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("kernelscale: error:")]
    assert len(err) == 1 and "x/log.pt" in err[0] and message in err[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not marker.exists(), "the pickle was executed"
    after = store_snapshot(store)
    assert after["manifest"] == before["manifest"]
    np.testing.assert_array_equal(after["test"], before["test"])


def test_bad_first_file_creates_no_store(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "log.pt").write_text("junk")
    with pytest.raises(BadInputError, match="a/log.pt"):
        ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    assert not Store.exists(tmp_path / "store")


def test_stop_at_first_bad_file_keeps_earlier_commits(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a", "c"):
        write_log(tmp_path / "src" / name / "log.pt", *_good(rng))
    (tmp_path / "src" / "b").mkdir()
    (tmp_path / "src" / "b" / "log.pt").write_text("junk")
    with pytest.raises(BadInputError, match="b/log.pt"):
        ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    s = Store.open(tmp_path / "store")
    assert [f["name"] for f in s.manifest["files"]] == ["a/log.pt"]


def test_skip_bad_records_rejected_and_exits_nonzero(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a", "c"):
        write_log(tmp_path / "src" / name / "log.pt", *_good(rng))
    (tmp_path / "src" / "b").mkdir()
    (tmp_path / "src" / "b" / "log.pt").write_text("junk")
    p = run_cli("ingest", str(tmp_path / "src"), "--store", str(tmp_path / "store"),
                "--skip-bad", check=False)
    assert p.returncode == 1
    assert "b/log.pt" in p.stderr
    s = Store.open(tmp_path / "store")
    assert [f["name"] for f in s.manifest["files"]] == ["a/log.pt", "c/log.pt"]
    assert [r["name"] for r in s.manifest["rejected"]] == ["b/log.pt"]
    info = run_cli("info", str(tmp_path / "store")).stdout
    assert "rejected 1" in info and "b/log.pt" in info


def test_fp32_file_into_fp16_store_is_refused(small_store, tmp_path):
    store, *_ = small_store
    rng = np.random.default_rng(0)
    write_log(tmp_path / "bad" / "f" / "log.pt", *_good(rng), dtype=torch.float32)
    with pytest.raises(BadInputError, match="dtype float32"):
        ingest_dir(tmp_path / "bad", store, show_progress=False)


# ------------------------------------------------------------------------- kill -9

@pytest.mark.fault
def test_ingest_killed_then_rerun_equals_uninterrupted(tmp_path):
    runs = [3] * 14
    random_source(tmp_path / "src", runs, n_test=300, n_train=2000, classes=10, seed=4)
    ingest_dir(tmp_path / "src", tmp_path / "clean", show_progress=False)
    store = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for target in (2, 6, 11):
        proc = subprocess.Popen([sys.executable, "-m", "kernelscale", "-q", "ingest",
                                 str(tmp_path / "src"), "--store", str(store)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                n = len(json.loads((store / "manifest.json").read_text())["files"])
            except (OSError, ValueError):
                n = 0
            if n >= target:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ingest_dir(tmp_path / "src", store, show_progress=False)
    assert_same_store(tmp_path / "clean", store)


def test_declared_shape_is_checked_for_every_file(tmp_path, small_source):
    src, *_ = small_source
    with pytest.raises(BadInputError, match=r"file000/log.pt: 40 test examples, but the declared "
                                            r"shape has 41"):
        ingest_dir(src, tmp_path / "store", shape=(41, 96, 5), show_progress=False)
    assert not Store.exists(tmp_path / "store")
    s = ingest_dir(src, tmp_path / "store", shape=(40, 96, 5), show_progress=False)
    assert s.files_ingested == 3
    with pytest.raises(BadInputError, match=r"not the expected \(40, 96, 6\)"):
        ingest_dir(src, tmp_path / "store", shape=(40, 96, 6), show_progress=False)


@pytest.mark.parametrize("fields,want", [
    ({"converters": 1, "t_wait": 10.0, "t_convert": 9.5, "t_commit": 2.0}, "conversion"),
    ({"converters": 2, "t_wait": 1.0, "t_convert": 8.0, "t_commit": 6.0}, "commit"),
    ({"converters": 2, "t_wait": 6.0, "t_convert": 14.0, "t_commit": 2.0}, "conversion"),
    ({"converters": 2, "t_wait": 6.0, "t_convert": 2.0, "t_commit": 1.0}, "reading the files"),
    ({"converters": 2, "t_wait": 6.0, "t_convert": 2.0, "t_commit": 1.0,
      "bytes_downloaded": 10}, "download"),
])
def test_summary_names_the_bottleneck(fields, want):
    s = IngestSummary(files_ingested=3, seconds=12.0, bytes_read=3 << 20, **fields)
    assert s.bottleneck() == want
    assert s.line().endswith(f"bottleneck: {want}")


@pytest.mark.fault
def test_a_changed_local_file_under_an_ingested_name_is_an_error(small_source, tmp_path):
    src, test, train = small_source
    store = tmp_path / "s"
    ingest_dir(src, store, show_progress=False)
    before = Store.open(store).manifest
    f = sorted(src.rglob("log.pt"))[1]
    write_log(f, test[:3], train[:3])  # same name, fewer runs: another size
    with pytest.raises(BadInputError, match="bytes, but the ingested file"):
        ingest_dir(src, store, show_progress=False)
    assert Store.open(store).manifest == before


@pytest.mark.fault
def test_hostile_files_cost_nothing(tmp_path):
    """A 1.5 kB file declaring a 100,000 x 100,000 x 10 tensor, random bytes, and empty
    dimensions are each refused with one line, quickly, and leave no store behind."""
    cases = {}
    big = torch.zeros(1, dtype=torch.float16).expand(100000, 100000, 10)
    cases["big"] = ({"logits": big, "logits_train": big}, "not stored densely")
    empty = torch.zeros(3, 0, 10, dtype=torch.float16)
    cases["empty"] = ({"logits": empty, "logits_train": empty}, "empty dimension")
    for name, (obj, want) in cases.items():
        f = tmp_path / name / "a" / "log.pt"
        f.parent.mkdir(parents=True)
        torch.save(obj, f)
        assert f.stat().st_size < 4096
        t0 = time.monotonic()
        r = run_cli("ingest", str(tmp_path / name), "--store", str(tmp_path / f"s-{name}"),
                    check=False)
        assert r.returncode != 0 and want in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 30
        assert not (tmp_path / f"s-{name}").exists()
    f = tmp_path / "rand" / "a" / "log.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(np.random.default_rng(0).bytes(1500))
    r = run_cli("ingest", str(tmp_path / "rand"), "--store", str(tmp_path / "s-rand"),
                check=False)
    assert r.returncode != 0 and "not a torch file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.fault
@pytest.mark.parametrize("glob", ["../**/log.pt", "/etc/*", "a/../../x/log.pt"])
def test_a_glob_that_leaves_the_source_is_refused(small_source, tmp_path, glob):
    src, *_ = small_source
    r = run_cli("ingest", str(src), "--store", str(tmp_path / "s"), "--glob", glob,
                check=False)
    assert r.returncode != 0 and "must be a pattern inside SOURCE" in r.stderr
    assert not (tmp_path / "s").exists()
