"""Any number of classes: simulate -> ingest -> kernel -> evaluate -> report at C = 2, 100
and 1000, class names, and labels as ``.npz`` or a ``.npy`` pair.

The truths here are independent: the kernel against :func:`tests.reference.reference_kernel`
(float64, from the simulated ``log.pt`` files), the k-NN against a per-row numpy vote
over the saved kernel, the baselines against numpy on the files' logits.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelscale import api
from kernelscale.errors import BadInputError
from kernelscale.knn import DEFAULT_KS, predictions_by_k
from kernelscale.labels import labels_from_arrays, load_labels
from kernelscale.report import CLASS_EXTREMES, CLASS_ROWS, ReportConfig, build_report
from kernelscale.simulation import SUBDIR, simulate
from kernelscale.topk import Neighbours
from tests.conftest import run_cli
from tests.reference import reference_kernel

#: per class count: (runs, n_train, n_test); small, yet every split has several classes.
SHAPES = {2: (6, 120, 40), 100: (6, 400, 120), 1000: (5, 600, 150)}
TEMPERATURE = 0.05


# ------------------------------------------------------------------ independent truths

def knn_reference(K: np.ndarray, y_train: np.ndarray, k: int, classes: int,
                  temperature: float | None = None) -> np.ndarray:
    """int64 (n,): per row, the k largest kernel values (ties to the smaller column) vote
    with weight 1 or exp((K - K_max) / T); the largest total wins, ties to the smaller
    label."""
    out = np.empty(K.shape[0], dtype=np.int64)
    cols = np.arange(K.shape[1])
    for i, row in enumerate(K.astype(np.float64)):
        top = np.lexsort((cols, -row))[:k]
        w = (np.ones(k) if temperature is None
             else np.exp((row[top] - row[top[0]]) / temperature))
        votes = np.zeros(classes)
        for j, wj in zip(top, w, strict=True):
            votes[y_train[j]] += wj
        out[i] = int(np.flatnonzero(votes == votes.max())[0])
    return out


def read_logits(sim: Path) -> tuple[np.ndarray, np.ndarray]:
    """float16 test (R, n_test, C) and train (R, n_train, C) of every simulated file, in
    the order of their ``code`` run ranges."""
    logs = [torch.load(p, weights_only=True) for p in (sim / SUBDIR).glob("*/log.pt")]
    logs.sort(key=lambda d: int(re.search(r"file_runs=\[(\d+),", d["code"]).group(1)))
    return (np.concatenate([d["logits"].numpy() for d in logs]),
            np.concatenate([d["logits_train"].numpy() for d in logs]))


def pct(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean() * 100)


# ------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module", params=sorted(SHAPES), ids=lambda c: f"C{c}")
def pipeline(request, tmp_path_factory):
    """simulate -> ingest -> kernel through the Python API, at one class count."""
    C = request.param
    runs, n_train, n_test = SHAPES[C]
    d = tmp_path_factory.mktemp(f"classes{C}")
    simulate(d / "sim", runs=runs, files=2, n_train=n_train, n_test=n_test, classes=C,
             seed=5, progress=False)
    api.ingest(d / "sim", d / "store", show_progress=False)
    api.compute_kernel(d / "store", d / "kernel", device="cpu", show_progress=False)
    return C, d


def test_kernel_matches_float64_reference(pipeline):
    C, d = pipeline
    test, train = read_logits(d / "sim")
    assert test.shape[2] == C and api.open_store(d / "store").shape.classes == C
    K = api.open_kernel(d / "kernel").numpy()
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


def test_evaluate_matches_numpy_knn_and_baselines(pipeline):
    C, d = pipeline
    test, _ = read_logits(d / "sim")
    with np.load(d / "sim" / "labels.npz") as z:
        y_train, y_test = z["train"], z["test"]
    assert len(np.unique(y_test)) > 1 and y_train.max() < C
    K = api.open_kernel(d / "kernel").numpy()
    ev = api.evaluate(d / "store", d / "kernel", d / "sim" / "labels.npz", k=3,
                      weighting="softmax", temperature=TEMPERATURE)
    assert ev.knn_accuracy == pytest.approx(pct(knn_reference(K, y_train, 3, C), y_test))
    assert ev.weighted_accuracy == pytest.approx(
        pct(knn_reference(K, y_train, 3, C, TEMPERATURE), y_test))
    # every k of the majority-vote curve, not only k = 3
    ks = ev.accuracy_by_k.ks
    assert list(ks) == [k for k in DEFAULT_KS if k <= K.shape[1]]
    for k, acc in zip(ks, ev.accuracy_by_k.curves["none"].accuracy, strict=True):
        assert acc == pytest.approx(pct(knn_reference(K, y_train, k, C), y_test)), k
    single = np.mean([pct(t.argmax(-1), y_test) for t in test.astype(np.float64)])
    ens = test.astype(np.float64).mean(0).astype(np.float16).argmax(-1)
    assert ev.single_model_accuracy == pytest.approx(single)
    assert ev.ensemble_accuracy == pytest.approx(pct(ens, y_test))


def test_report_renders_and_stays_readable(pipeline, tmp_path):
    C, d = pipeline
    with np.load(d / "sim" / "labels.npz") as z:
        y_train, y_test, names = z["train"], z["test"], list(z["class_names"])
    index = build_report(ReportConfig(store=d / "store", kernel=d / "kernel",
                                      labels=str(d / "sim" / "labels.npz"),
                                      out=tmp_path / "r", examples=4))
    html = index.read_text(encoding="utf-8")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["class_names"] == names == [f"sim-{c:0{len(str(C - 1))}d}" for c in range(C)]
    # every class in report.json, its accuracy the numpy k-NN's on that class
    K = api.open_kernel(d / "kernel").numpy()
    pred = knn_reference(K, y_train, 3, C)
    rows = data["per_class"]["classes"]
    assert [r["class"] for r in rows] == list(range(C))
    for r in rows:
        mine = y_test == r["class"]
        assert r["test_examples"] == int(mine.sum())
        assert r["correct"] == int((pred[mine] == r["class"]).sum())
        wrong = pred[mine & (pred != y_test)]
        if wrong.size:
            counts = np.bincount(wrong, minlength=C)
            assert r["mistake"]["label"] == int(counts.argmax())
            assert r["mistake"]["count"] == int(counts.max())
        else:
            assert r["mistake"] is None
    section = html[html.index('<section id="classes">'):]
    section = section[:section.index("</section>")]
    shown = section.count("<tr") - section.count("<thead>")  # body rows of its tables
    if C <= CLASS_ROWS:
        assert shown == C and "per-class.png" not in html
        for n in names:
            assert n in section
    else:
        assert shown == CLASS_EXTREMES  # the lowest classes only, never one row per class
        assert "per-class.png" in section
        assert (tmp_path / "r" / "per-class.png").read_bytes()[:4] == b"\x89PNG"
        assert f"{C} classes" in section
    # the whole page stays small whatever C is
    assert html.count("<tr") < 250 and len(html) < 200_000


def test_cli_pipeline_at_1000_classes(tmp_path):
    runs, n_train, n_test = SHAPES[1000]
    sim, store, kern = tmp_path / "sim", tmp_path / "store", tmp_path / "kernel"
    out = run_cli("simulate", "--out", str(sim), "--runs", str(runs), "--files", "1",
                  "--n-train", str(n_train), "--n-test", str(n_test), "--classes", "1000",
                  "--seed", "2").stdout
    assert "classes 1000" in out and "labels.npz" in out
    run_cli("ingest", str(sim), "--store", str(store))
    run_cli("kernel", "--store", str(store), "--out", str(kern), "--device", "cpu")
    ev = json.loads(run_cli("evaluate", "--store", str(store), "--kernel", str(kern),
                            "--labels", str(sim / "labels.npz"), "--json").stdout)
    with np.load(sim / "labels.npz") as z:
        y_train, y_test = z["train"], z["test"]
    K = api.open_kernel(kern).numpy()
    assert ev["knn_accuracy"] == pytest.approx(
        pct(knn_reference(K, y_train, 3, 1000), y_test), abs=0.01)
    run_cli("report", "--store", str(store), "--kernel", str(kern), "--labels",
            str(sim / "labels.npz"), "--out", str(tmp_path / "r"))
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert 'id="classes"' in html and "sim-" in html


# --------------------------------------------------------------------------- voting

def test_votes_match_reference_at_any_class_count():
    rng = np.random.default_rng(1)
    for C in (2, 3, 100, 1000):
        n, kmax, n_train = 300, 20, 250
        # coarse values: ties between kernel values and between vote totals
        vals = -np.sort(-np.round(rng.normal(size=(n, kmax)), 1), axis=1).astype(np.float32)
        idx = rng.permuted(np.tile(np.arange(n_train), (n, 1)), axis=1)[:, :kmax]
        y = rng.integers(0, C, n_train)
        K = np.full((n, n_train), -10.0)  # the same neighbours as a dense kernel
        np.put_along_axis(K, idx, vals.astype(np.float64), axis=1)
        # ties among equal values go to the smaller column: make nb's order that order
        order = np.lexsort((idx, -vals.astype(np.float64)), axis=1)
        nb = Neighbours(np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1))
        ks = [1, 2, 3, 7, 20]
        got = predictions_by_k(nb, y, "none", None, ks, C)
        soft = predictions_by_k(nb, y, "softmax", 0.1, ks, C)
        for j, k in enumerate(ks):
            np.testing.assert_array_equal(got[j], knn_reference(K, y, k, C), err_msg=f"{C} {k}")
            np.testing.assert_array_equal(soft[j], knn_reference(K, y, k, C, 0.1))


def test_vote_memory_does_not_grow_with_classes():
    rng = np.random.default_rng(2)
    n, kmax, C = 5000, 50, 1000
    nb = Neighbours(-np.sort(-rng.normal(size=(n, kmax)), 1).astype(np.float32),
                    rng.integers(0, 4000, (n, kmax)))
    y = rng.integers(0, C, 4000)
    tracemalloc.start()
    try:
        predictions_by_k(nb, y, "power", 8.0, DEFAULT_KS, C)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a (rows, kmax, classes) float64 one-hot of all 5000 rows would be 2 GB
    assert peak < 150 << 20, peak


# --------------------------------------------------------------------------- labels

def write_pair(stem: Path, train, test, names=None) -> None:
    np.save(f"{stem}.train.npy", np.asarray(train))
    np.save(f"{stem}.test.npy", np.asarray(test))
    if names is not None:
        np.save(f"{stem}.class_names.npy", np.asarray(names))


def test_npy_pair_loads_like_npz(tmp_path):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 100, 50), rng.integers(0, 100, 20).astype(np.int32)
    names = [f"n{c}" for c in range(100)]
    np.savez(tmp_path / "lab.npz", train=tr, test=te, class_names=np.array(names))
    write_pair(tmp_path / "lab", tr, te, names)
    a = load_labels(str(tmp_path / "lab.npz"), n_train=50, n_test=20, classes=100)
    for spec in ("lab.train.npy", "lab.test.npy"):
        b = load_labels(str(tmp_path / spec), n_train=50, n_test=20, classes=100)
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
        assert b.train.dtype == b.test.dtype == np.int64
        assert a.class_names == b.class_names == tuple(names)
    (tmp_path / "lab.class_names.npy").unlink()
    assert load_labels(str(tmp_path / "lab.train.npy"), classes=100).class_names is None
    # byte-string names are read as UTF-8
    np.savez(tmp_path / "b.npz", train=tr, test=te,
             class_names=np.array([n.encode() for n in names]))
    assert load_labels(str(tmp_path / "b.npz"), classes=100).class_names == tuple(names)


def npz_named(path: Path, **arrays) -> None:
    """An .npz under exactly ``path`` (np.savez appends .npz to a name without it)."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "lab.npy", np.zeros(5, np.int64)), "a single .npy array"),
    (lambda p: np.save(p / "lab.train.npy", np.zeros(5, np.int64)), "lab.test.npy: no such"),
    (lambda p: (np.save(p / "lab.train.npy", np.zeros(5, np.int64)),
                npz_named(p / "lab.test.npy", test=np.zeros(5))),
     "lab.test.npy: not an .npy array"),
    (lambda p: write_pair(p / "lab", np.zeros(5, np.int64), np.zeros(3, np.int64),
                          ["a", "b"]), "2 class_names, but the store has 4 classes"),
    (lambda p: write_pair(p / "lab", np.zeros(5, np.int64), np.array([0, 4, 9])),
     "test labels out of range [0, 4): 2 of 3"),
    (lambda p: write_pair(p / "lab", np.zeros(6, np.int64), np.zeros(3, np.int64)),
     "6 train labels, but the store has 5"),
    (lambda p: write_pair(p / "lab", np.zeros(5), np.zeros(3)), "1-D integer array"),
    (lambda p: write_pair(p / "lab", np.zeros(5, np.int64), np.zeros(3, np.int64),
                          np.zeros(4)), "class_names must be a 1-D array of strings"),
])
def test_bad_npy_labels_one_line(tmp_path, make, msg):
    make(tmp_path)
    spec = tmp_path / ("lab.npy" if (tmp_path / "lab.npy").exists() else "lab.train.npy")
    with pytest.raises(BadInputError) as e:
        load_labels(str(spec), n_train=5, n_test=3, classes=4)
    assert msg in str(e.value) and "\n" not in str(e.value)


class _Marker:
    """Unpickling this would create a file: the proof that nothing was unpickled."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("where", ["npz", "npy"])
def test_pickled_class_names_are_refused_not_executed(tmp_path, where):
    marker = tmp_path / "unpickled"
    _Marker.path = str(marker)
    names = np.array([_Marker(), "b"], dtype=object)
    tr, te = np.zeros(5, np.int64), np.zeros(3, np.int64)
    if where == "npz":
        np.savez(tmp_path / "lab.npz", train=tr, test=te, class_names=names)
        spec = tmp_path / "lab.npz"
    else:
        write_pair(tmp_path / "lab", tr, te)
        np.save(tmp_path / "lab.class_names.npy", names, allow_pickle=True)
        spec = tmp_path / "lab.train.npy"
    with pytest.raises(BadInputError, match="string array"):
        load_labels(str(spec), classes=2)
    assert not marker.exists()


def test_class_names_without_a_store_bound_the_labels():
    with pytest.raises(BadInputError, match=r"out of range \[0, 2\).*class_names name 2"):
        labels_from_arrays([0, 2], [1], class_names=["a", "b"])
    lab = labels_from_arrays(np.array([0, 1], np.uint8), [1], class_names=np.array(["a", "b"]))
    assert lab.class_names == ("a", "b") and lab.train.dtype == np.int64


def test_cifar10_labels_refused_for_another_class_count(monkeypatch):
    import torchvision

    def never(*a, **k):
        raise AssertionError("CIFAR-10 was loaded")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", never)
    with pytest.raises(BadInputError, match="CIFAR-10 has 10 classes, but the store has 100"):
        load_labels("cifar10:/nowhere", n_train=50000, n_test=10000, classes=100)


@pytest.fixture(scope="module")
def store100(tmp_path_factory):
    """A 100-class store and kernel (simulated), for the CLI's labels errors."""
    d = tmp_path_factory.mktemp("s100")
    simulate(d / "sim", runs=4, files=1, n_train=150, n_test=60, classes=100, seed=1,
             progress=False)
    api.ingest(d / "sim", d / "store", show_progress=False)
    api.compute_kernel(d / "store", d / "kernel", device="cpu", show_progress=False)
    with np.load(d / "sim" / "labels.npz") as z:
        return d, z["train"], z["test"]


def test_cli_labels_errors_are_one_line(tmp_path, store100):
    d, tr, te = store100
    cases = {
        "names.npz": (dict(train=tr, test=te, class_names=np.array(["x"] * 10)),
                      "10 class_names, but the store has 100 classes"),
        "high.npz": (dict(train=np.where(np.arange(tr.size) < 3, 100, tr), test=te),
                     "train labels out of range [0, 100): 3 of 150"),
        "short.npz": (dict(train=tr[:-1], test=te), "149 train labels, but the store has 150"),
    }
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / name, **arrays)
        for cmd in ("evaluate", "report"):
            extra = ["--out", str(tmp_path / "r")] if cmd == "report" else []
            p = run_cli(cmd, "--store", str(d / "store"), "--kernel", str(d / "kernel"),
                        "--labels", str(tmp_path / name), *extra, check=False)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1, (name, cmd, p.stderr)
            assert name in lines[0] and msg in lines[0], (name, cmd, lines)
    assert not (tmp_path / "r").exists()


def test_report_class_names_from_npy_pair_or_defaults(tmp_path, store100):
    d, tr, te = store100
    names = [f"species {c}" for c in range(100)]
    write_pair(tmp_path / "named", tr, te, names)
    write_pair(tmp_path / "plain", tr, te)
    for stem, expect in (("named", names), ("plain", [f"class {c}" for c in range(100)])):
        out = tmp_path / f"r-{stem}"
        build_report(ReportConfig(store=d / "store", kernel=d / "kernel",
                                  labels=str(tmp_path / f"{stem}.test.npy"), out=out))
        data = json.loads((out / "report.json").read_text())
        assert data["class_names"] == expect
        assert [r["name"] for r in data["per_class"]["classes"]] == expect
        assert data["provenance"]["labels"] == str((tmp_path / f"{stem}.test.npy").resolve())


@pytest.mark.parametrize("classes", [10, 1000])
def test_ablation_view_summarises_many_classes(tmp_path, classes):
    from kernelscale import report
    from kernelscale.evaluation import Ablation, Evaluation
    from kernelscale.knn import Choice, Setting

    rng = np.random.default_rng(3)
    acc = np.round(rng.uniform(20, 90, classes), 2)
    best = Choice(Setting(5), 80.0)
    abl = [Ablation(f"class-{c}", f"a/class-{c}", c, True, float(acc[c]), best)
           for c in range(classes)]
    abl.append(Ablation("no-log-softmax", "a/raw", None, False, 55.5, best))
    ev = Evaluation(30, 3, 60.0, 70.0, 71.0, {}, setting=Setting(3), weighted_accuracy=71.0,
                    oracle=best, ablations=abl)
    names = [f"n{c}" for c in range(classes)]
    fig = report._fig_ablation(ev, names, tmp_path / "ablation.png")
    assert (tmp_path / fig).read_bytes()[:4] == b"\x89PNG"
    html = report._ablation_section(ev, fig, names)
    rows = html.count("<tr") - html.count("<thead>")  # body rows, highlighted ones too
    assert "no log-softmax (raw logits)" in html and "55.50" in html
    if classes <= CLASS_ROWS:
        assert rows == classes + 2
        assert all(f"class {c} only (n{c})" in html for c in range(classes))
    else:
        assert rows == 3 + CLASS_EXTREMES  # summed, raw, summary, the extremes
        order = np.argsort(-acc, kind="stable")
        for c in order[:CLASS_EXTREMES // 2]:
            assert f"class {c} only (n{c}) — highest" in html
        for c in order[-(CLASS_EXTREMES // 2):]:
            assert f"class {c} only (n{c}) — lowest" in html
        assert f"{acc.mean():.2f} ({np.median(acc):.2f})" in html
