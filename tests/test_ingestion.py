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

from kernelscale import fused
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
    # the file repaired, the next ingest takes it and it is no longer listed as rejected
    write_log(tmp_path / "src" / "b" / "log.pt", *_good(rng))
    run_cli("ingest", str(tmp_path / "src"), "--store", str(tmp_path / "store"), "--skip-bad")
    s = Store.open(tmp_path / "store")
    assert [f["name"] for f in s.manifest["files"]] == ["a/log.pt", "c/log.pt", "b/log.pt"]
    assert s.manifest["rejected"] == []


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
    ({"converters": 1, "t_wait": 10.0, "t_convert": 11.0, "t_commit": 2.0}, "conversion"),
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


# ------------------------------------------------------------------ ingest --dry-run

def _tree(root):
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in Path(root).rglob("*")}


def test_dry_run_creates_nothing_and_its_numbers_match_the_ingest(tmp_path):
    """Before a first ingest and before an extension: the dry run writes nothing, exits
    0, and names the files, runs and store bytes the ingest then has."""
    src = tmp_path / "src"
    test, train = random_source(src, [7, 8, 9, 5])
    store = tmp_path / "out" / "store"
    for max_files, added in ((2, [7, 8]), (None, [9, 5])):
        extra = ("--max-files", str(max_files)) if max_files else ()
        before = _tree(tmp_path)
        p = run_cli("ingest", str(src), "--store", str(store), "--run-chunk", "4",
                    "--dry-run", "--json", *extra)
        assert _tree(tmp_path) == before
        plan = json.loads(p.stdout)
        old = Store.open(store).runs if Store.exists(store) else 0
        assert [e["runs"] for e in plan["entries"]] == added
        assert plan["runs"] == {"to_add": sum(added), "known": sum(added),
                                "methods": plan["runs"]["methods"], "before": old,
                                "after": old + sum(added)}
        sizes = {f.relative_to(src).as_posix(): f.stat().st_size for f in src.rglob("*.pt")}
        assert plan["files"]["bytes"] == sum(sizes[e["name"]] for e in plan["entries"])
        text = run_cli("ingest", str(src), "--store", str(store), "--run-chunk", "4",
                       "--dry-run", *extra).stdout
        assert f"-> the store will hold {old + sum(added)}" in text
        assert "nothing downloaded, nothing written" in text and _tree(tmp_path) == before
        old_bytes = _chunk_bytes(store)
        s = ingest_dir(src, store, run_chunk=4, max_files=max_files, show_progress=False)
        assert (s.files_ingested, s.runs_added, s.bytes_read) == (
            plan["files"]["to_ingest"], plan["runs"]["to_add"], plan["files"]["bytes"])
        disk = plan["disk"]["store"]
        new_bytes = _chunk_bytes(store)
        assert disk["logits"] == new_bytes["logits"] - old_bytes["logits"]
        assert disk["statistics"] == new_bytes["stats"] - old_bytes["stats"]
        whole = new_bytes["all"] - old_bytes["all"]
        assert whole <= disk["total"] <= whole + 16 * 1024
    np.testing.assert_array_equal(Store.open(store).read("test", 0, 29), test)


def _chunk_bytes(store):
    """Bytes of a store's logits and statistics chunk files, and of all its files."""
    if not Path(store).exists():
        return {"logits": 0, "stats": 0, "all": 0}
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    return {"logits": sum(p.stat().st_size for p in files
                          if "logits" in p.parts and "c" in p.parts),
            "stats": sum(p.stat().st_size for p in files
                         if "stats" in p.parts and "c" in p.parts),
            "all": sum(p.stat().st_size for p in files)}


def test_dry_run_stops_where_max_runs_would_and_fails_where_the_ingest_would(small_store,
                                                                              tmp_path):
    store, *_ = small_store
    src = tmp_path / "src"
    write_log(src / "logs_saveoutputs_main" / "file999" / "log.pt",
              np.zeros((4, 40, 5), np.float16), np.zeros((4, 96, 5), np.float16))
    plan = json.loads(run_cli("ingest", str(src), "--store", str(store), "--dry-run",
                              "--json", "--max-runs", "27").stdout)
    assert plan["files"]["to_ingest"] == 0 and plan["runs"]["to_add"] == 0
    assert any("stops before logs_saveoutputs_main/file999/log.pt" in n
               for n in plan["notes"])
    (src / "logs_saveoutputs_main" / "file000" / "log.pt").write_bytes(b"changed")
    before = _tree(tmp_path)
    p = run_cli("ingest", str(src), "--store", str(store), "--dry-run", check=False)
    assert p.returncode == 2 and "a store holds one version of each file" in p.stderr
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------- labels

def test_labels_travel_with_the_store(small_store, tmp_path):
    """ingest --labels records labels and names once; evaluate without --labels uses
    them and gives what --labels FILE gives; the store opens as before."""
    from tests.reference import labels_file

    store, *_ = small_store
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    names = np.array(["cat", "dog", "eel", "fox", "gnu"])
    z = dict(np.load(lab))
    np.savez(lab, **z, class_names=names)
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    ev = ("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"), "--json")
    p = run_cli(*ev, check=False)  # nothing recorded, none given: one clear line
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "no labels" in p.stderr and "--labels" in p.stderr
    before = Store.open(store).manifest
    p = run_cli("ingest", str(tmp_path / "src"), "--store", str(store), "--labels", str(lab))
    assert "0 file(s) ingested, 3 skipped" in p.stdout and "labels recorded from" in p.stdout
    m = Store.open(store).manifest
    assert {k: v for k, v in m.items() if k != "labels"} == before
    rec = m["labels"]
    assert rec["class_names"] == list(names) and rec["source"] == str(lab.resolve())
    with np.load(store / rec["file"]) as f:  # the recorded arrays are the file's
        np.testing.assert_array_equal(f["train"], z["train"])
        np.testing.assert_array_equal(f["test"], z["test"])
    own = json.loads(run_cli(*ev).stdout)
    given = json.loads(run_cli(*ev, "--labels", str(lab)).stdout)
    assert own.pop("provenance")["labels"] == str(store.resolve())
    assert given.pop("provenance")["labels"] == str(lab.resolve())
    assert own == given and own["knn_accuracy"] is not None
    assert "classes: cat, dog, eel, fox, gnu" in run_cli("info", str(store)).stdout
    curve = ("curve", "--store", str(store), "--runs", "8,all", "--device", "cpu", "--json")
    own = json.loads(run_cli(*curve, "--out", str(tmp_path / "c1")).stdout)
    given = json.loads(run_cli(*curve, "--out", str(tmp_path / "c2"), "--labels",
                               str(lab)).stdout)
    def scores(doc):  # the points less their timings
        return [{k: v for k, v in pt.items() if "seconds" not in k} for pt in doc["points"]]

    assert scores(own) == scores(given) and len(scores(own)) == 2
    # the same labels again (from a .npy pair): unchanged, nothing rewritten
    np.save(tmp_path / "pair.train.npy", z["train"])
    np.save(tmp_path / "pair.test.npy", z["test"])
    np.save(tmp_path / "pair.class_names.npy", names)
    mtime = (store / rec["file"]).stat().st_mtime_ns
    p = run_cli("ingest", str(tmp_path / "src"), "--store", str(store), "--labels",
                str(tmp_path / "pair.train.npy"))
    assert "labels unchanged" in p.stdout
    assert (store / rec["file"]).stat().st_mtime_ns == mtime


def test_other_labels_are_refused_unless_replaced(small_store, tmp_path):
    from tests.reference import labels_file

    store, *_ = small_store
    a = labels_file(tmp_path / "a.npz", 96, 40, 5, seed=1)
    b = labels_file(tmp_path / "b.npz", 96, 40, 5, seed=2)
    src = tmp_path / "src"
    run_cli("ingest", str(src), "--store", str(store), "--labels", str(a))
    first = Store.open(store).manifest["labels"]
    before = _tree(store)
    for extra in ((), ("--dry-run",)):
        p = run_cli("ingest", str(src), "--store", str(store), "--labels", str(b), *extra,
                    check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1
        assert "holds other labels" in p.stderr and "--labels-replace" in p.stderr
        assert _tree(store) == before
    bad = tmp_path / "bad.npz"
    np.savez(bad, train=np.zeros(95, np.int64), test=np.zeros(40, np.int64))
    p = run_cli("ingest", str(src), "--store", str(store), "--labels", str(bad),
                "--labels-replace", check=False)
    assert p.returncode == 2 and "95 train labels, but the store has 96" in p.stderr
    assert _tree(store) == before
    p = run_cli("ingest", str(src), "--store", str(tmp_path / "new"), "--labels", str(bad),
                check=False)  # a new store: checked against the first file's header first
    assert p.returncode == 2 and "95 train labels, but the store has 96" in p.stderr
    assert not (tmp_path / "new").exists()
    p = run_cli("ingest", str(src), "--store", str(store), "--labels", str(b),
                "--labels-replace")
    assert "labels replaced from" in p.stdout
    rec = Store.open(store).manifest["labels"]
    assert rec["digest"] != first["digest"] and rec["source"] == str(b.resolve())
    assert not (store / first["file"]).exists() and (store / rec["file"]).exists()
    with np.load(store / rec["file"]) as f:
        np.testing.assert_array_equal(f["train"], np.load(b)["train"])


def test_a_job_uses_the_labels_its_ingest_recorded(tmp_path):
    """[ingest] labels = ...; [evaluate] without labels: the store's labels are used, and
    the results equal those of `evaluate --labels FILE`."""
    from tests.reference import labels_file

    random_source(tmp_path / "src", [6, 6])
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5, seed=3)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
name = "labels"
workdir = "{tmp_path / 'w'}"
[ingest]
source = "{tmp_path / 'src'}"
labels = "{lab}"
[kernel]
device = "cpu"
[evaluate]
json = "results.json"
""")
    run_cli("run", str(job))
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    p = run_cli("evaluate", "--store", str(tmp_path / "w" / "store"), "--kernel",
                str(tmp_path / "w" / "kernel"), "--labels", str(lab), "--json")
    assert json.loads(p.stdout)["knn_accuracy"] == res["knn_accuracy"]
    assert json.loads(p.stdout)["ensemble_accuracy"] == res["ensemble_accuracy"]


def test_labels_recording_killed_before_its_commit_keeps_the_old_labels(small_store,
                                                                         monkeypatch):
    """The manifest is the commit point: a recording killed after writing its file and
    before the manifest leaves the previous labels in force; the next one tidies up."""
    import kernelscale.store as storemod
    from kernelscale.labels import store_labels

    store, *_ = small_store
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 5, 96), rng.integers(0, 5, 40))
    b = (rng.integers(0, 5, 96), rng.integers(0, 5, 40))
    s = Store.open(store, mode="a")
    with s.writer():
        assert s.record_labels(*a, None, "a") == "recorded"
    first = set(store.glob("labels-*.npz"))

    def killed(path, obj):
        raise OSError("killed")

    monkeypatch.setattr(storemod, "atomic_write_json", killed)
    with pytest.raises(OSError), s.writer():
        s.record_labels(*b, None, "b", replace=True)
    monkeypatch.undo()
    got = store_labels(store)
    np.testing.assert_array_equal(got.train, a[0])
    assert len(set(store.glob("labels-*.npz"))) == 2  # the stray file of the killed one
    with s.writer():
        assert s.record_labels(*b, ["v", "w", "x", "y", "z"], "b", replace=True) == \
            "replaced"
    left = set(store.glob("labels-*.npz"))
    assert len(left) == 1 and not left & first
    got = store_labels(store)
    np.testing.assert_array_equal(got.test, b[1])
    assert got.class_names == ("v", "w", "x", "y", "z")


def test_an_ingest_on_the_cpu_loads_no_torch(tmp_path):
    """Plain log.pt files are mapped and summarised without torch (~1.5 s of every
    ingest process), and the store holds what torch.load reads."""
    test, train = random_source(tmp_path / "src", [4, 5], n_test=30, n_train=70)
    code = ("import sys\n"
            "import kernelscale.device as d\n"
            "d.GPU_NODES = ()  # a node without GPU drivers, whatever this one has\n"
            "from kernelscale.cli import main\n"
            f"rc = main(['-q', 'ingest', {str(tmp_path / 'src')!r}, '--store', "
            f"{str(tmp_path / 'store')!r}])\n"
            "print(rc, 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), fused.ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-2:] == ["0", "False"]
    s = Store.open(tmp_path / "store")
    np.testing.assert_array_equal(s.read("test", 0, 9), test)
    np.testing.assert_array_equal(s.read("train", 0, 9), train)
