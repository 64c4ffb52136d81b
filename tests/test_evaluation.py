"""Weighted k-NN, honest selection, ablations and the run curve against independent references."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale import knn as ev_mod
from kernelscale.knn import (
    Candidates,
    Grid,
    Setting,
    crossfit,
    leave_one_out,
    predict,
    predictions_by_k,
)
from kernelscale.topk import top_neighbours
from tests.conftest import run_cli
from tests.reference import knn_predict

# ----------------------------------------------------------------- brute-force reference
# Written from the definitions in the evaluate module's docstring, one row at a time, with
# Python floats: neighbours by (largest value, smallest column); weights 1, max(K,0)^p or
# exp(K/T); the label with the largest exactly-rounded sum of weights (math.fsum) wins.


def ref_neighbours(K, k, exclude_self=False):
    out = []
    for i, row in enumerate(np.asarray(K, dtype=np.float64)):
        cand = sorted((-float(v), j) for j, v in enumerate(row) if not (exclude_self and j == i))
        out.append([j for _, j in cand[:k]])
    return out


def ref_scores(K, y_train, k, weighting, param, classes, exclude_self=False):
    """Per row: the classes' summed weights (list of floats)."""
    K = np.asarray(K, dtype=np.float64)
    rows = []
    for i, nbrs in enumerate(ref_neighbours(K, k, exclude_self)):
        vals = [float(K[i, j]) for j in nbrs]
        if weighting == "none":
            w = [1.0] * len(vals)
        elif weighting == "power":
            w = [max(v, 0.0) ** param for v in vals]
            if not any(w):
                w = [1.0] * len(vals)
        else:
            w = [math.exp(v / param) for v in vals]
        rows.append([math.fsum(wi for wi, j in zip(w, nbrs, strict=True) if y_train[j] == c)
                     for c in range(classes)])
    return rows


def check_predictions(pred, scores, exact):
    """``pred`` must be a top class; with exact arithmetic the smallest of the top classes."""
    for i, (p, s) in enumerate(zip(pred, scores, strict=True)):
        best = max(s)
        near = [c for c in range(len(s)) if abs(s[c] - best) <= 1e-9 * max(1.0, abs(best))]
        assert p in near, (i, p, s)
        if exact:
            assert p == min(c for c in range(len(s)) if s[c] == best), (i, p, s)


def tied_kernel(rng, n, m, grid=(-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)):
    """float32 (n, m) drawn from a few dyadic values: many ties, exact arithmetic."""
    return rng.choice(np.asarray(grid, dtype=np.float32), size=(n, m))


SETTINGS = [("none", None, True), ("power", 1.0, True), ("power", 2.0, True),
            ("power", 3.0, True), ("power", 0.5, False), ("softmax", 0.05, False),
            ("softmax", 1.0, False)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_knn_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    C = 4
    K = tied_kernel(rng, 37, 29)
    K[5] = 0.25  # a row of equal values: the neighbours are the first columns
    K[6] = -0.5  # no positive value: power weighting falls back to the majority vote
    y = rng.integers(0, C, 29)
    # a Zarr array with small chunks: several blocks read on several threads
    za = zarr.create_array(store={}, shape=K.shape, chunks=(5, 8), dtype="float32")
    za[...] = K
    nb = top_neighbours(za, 9, workers=3)
    assert nb.index.tolist() == ref_neighbours(K, 9)
    assert np.array_equal(nb.values, np.take_along_axis(K, nb.index, axis=1))
    assert nb.index[5].tolist() == list(range(9))
    ks = [1, 2, 3, 4, 5, 7, 9]
    for weighting, param, exact in SETTINGS:
        all_k = predictions_by_k(nb, y, weighting, param, ks, C)
        for row, k in zip(all_k, ks, strict=True):
            scores = ref_scores(K, y, k, weighting, param, C)
            check_predictions(row, scores, exact)
            one = predict(nb, y, Setting(k, weighting, param), C)
            assert np.array_equal(one, row)


def test_majority_vote_is_torch_mode():
    """The vote of the weighting 'none' is the reference's torch.mode, ties included."""
    rng = np.random.default_rng(3)
    C = 5
    K = rng.standard_normal((300, 50)).astype(np.float32)
    y = rng.integers(0, C, 50)
    nb = top_neighbours(K, 8)
    for k in (2, 3, 4, 6, 8):
        assert np.array_equal(predict(nb, y, Setting(k), C), knn_predict(nb.index[:, :k], y))


def test_neighbours_ties_across_blocks_and_diagonal():
    rng = np.random.default_rng(4)
    K = tied_kernel(rng, 50, 50, grid=(0.0, 0.5, 1.0))
    for rc in (1, 7, 64):
        nb = top_neighbours(K, 6, row_chunk=rc, workers=2)
        assert nb.index.tolist() == ref_neighbours(K, 6)
        nb = top_neighbours(K, 6, exclude_diagonal=True, row_chunk=rc, workers=2)
        assert nb.index.tolist() == ref_neighbours(K, 6, exclude_self=True)
    # k larger than the columns: all of them
    assert top_neighbours(K[:, :4], 10).kmax == 4
    assert top_neighbours(K[:, :4], 10, exclude_diagonal=True).kmax == 3


def test_leave_one_out_never_sees_the_example_itself():
    rng = np.random.default_rng(5)
    n, C = 60, 3
    y = rng.integers(0, C, n)
    K = rng.uniform(-0.3, 0.3, (n, n)).astype(np.float32)
    K = (K + K.T) / 2
    np.fill_diagonal(K, 1.0)  # every example is its own most similar one
    with_self = top_neighbours(K, 5)
    assert (with_self.index[:, 0] == np.arange(n)).all()  # the trap is armed
    nb = top_neighbours(K, 5, exclude_diagonal=True)
    assert not (nb.index == np.arange(n)[:, None]).any()
    grid = Grid(ks=(1, 3, 5), powers=(2.0,), temperatures=(0.1,))
    # a test table whose accuracies are known: setting i correct on its first i rows
    settings = grid.settings()
    correct = np.zeros((len(settings), 10), dtype=bool)
    for i in range(len(settings)):
        correct[i, :i] = True
    table = Candidates(settings, correct)
    sel = leave_one_out(nb, y, table, grid, C)
    # reference: brute-force leave-one-out accuracy of every setting; first best wins
    ref = []
    for s in settings:
        scores = ref_scores(K, y, s.k, s.weighting, s.param, C, exclude_self=True)
        pred = [int(np.argmax(r)) for r in scores]  # exact ties: the smallest label
        ref.append(np.mean(np.asarray(pred) == y) * 100)
    best = int(np.argmax(ref))
    assert sel.method == "leave-one-out"
    assert sel.setting == settings[best]
    assert sel.selection_accuracy == pytest.approx(ref[best])
    assert sel.selection_rows == n
    assert sel.accuracy == pytest.approx(best / 10 * 100)
    assert max(ref) < 100.0  # including itself, 1-NN would be perfect


def test_crossfit_never_scores_on_the_half_it_chose_on(monkeypatch):
    rng = np.random.default_rng(6)
    n = 101
    settings = [Setting(1), Setting(3), Setting(5)]
    table = Candidates(settings, rng.random((3, n)) < 0.6)
    calls = []
    choose, score = ev_mod._choose, ev_mod._score
    monkeypatch.setattr(ev_mod, "_choose",
                        lambda t, rows: (calls.append(("choose", set(rows.tolist()))),
                                         choose(t, rows))[1])
    monkeypatch.setattr(ev_mod, "_score",
                        lambda t, i, rows: (calls.append(("score", set(rows.tolist()))),
                                            score(t, i, rows))[1])
    crossfit(table, seed=7)
    assert [c[0] for c in calls] == ["choose", "score", "choose", "score"]
    (_, a1), (_, b1), (_, a2), (_, b2) = calls
    assert a1.isdisjoint(b1) and a2.isdisjoint(b2)
    assert a1 | b1 == set(range(n)) and a1 == b2 and b1 == a2
    # adversarial table: setting 0 right exactly on the first half, setting 1 on the second.
    # Choosing on the half that is scored would give 100%; honest cross-fitting gives 0%.
    adv = np.zeros((2, n), dtype=bool)
    adv[0, sorted(a1)] = True
    adv[1, sorted(b1)] = True
    calls.clear()
    res = crossfit(Candidates(settings[:2], adv), seed=7)
    assert res.method == "cross-fit" and res.seed == 7 and res.setting is None
    assert res.accuracy == 0.0
    assert [f.setting.k for f in res.folds] == [1, 3]
    assert all(f.accuracy_where_chosen == 100.0 for f in res.folds)
    assert [f.chosen_on_rows + f.scored_on_rows for f in res.folds] == [n, n]


def test_evaluate_cli_weighted_and_selected_against_reference(tmp_path, small_store):
    from kernelscale.kernelread import load_kernel
    from tests.reference import labels_file

    store, *_ = small_store
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(lab), "--k", "5", "--weighting", "softmax",
                "--temperature", "0.1", "--select", "--json")
    d = json.loads(p.stdout)
    K = load_kernel(tmp_path / "k").array[...]
    z = np.load(lab)
    for weighting, param, key in (("none", None, "knn_accuracy"),
                                  ("softmax", 0.1, "weighted_accuracy")):
        scores = ref_scores(K, z["train"], 5, weighting, param, 5)
        ref = np.mean(np.asarray([int(np.argmax(s)) for s in scores]) == z["test"]) * 100
        assert d[key] == pytest.approx(ref)
    assert d["selection"]["method"] == "cross-fit"
    assert len(d["selection"]["folds"]) == 2
    assert "crossfit" not in d  # the selection is the cross-fit: not written twice
    assert d["oracle"]["accuracy"] >= max(d["knn_accuracy"], d["weighted_accuracy"])
    text = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                   "--labels", str(lab), "--select").stdout
    assert "selected k-NN (cross-fit)" in text and "oracle k-NN (chosen with test labels)" \
        in text


def test_evaluate_with_train_kernel_and_mismatch(tmp_path, small_store):
    from tests.reference import labels_file

    store, *_ = small_store
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "tt"),
            "--pairs", "train-train")
    d = json.loads(run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                           "--labels", str(lab), "--train-kernel", str(tmp_path / "tt"),
                           "--json").stdout)
    assert d["selection"]["method"] == "leave-one-out"
    assert d["selection"]["selection_rows"] == 96
    assert d["selection"]["train_kernel"] == str(tmp_path / "tt")
    assert d["crossfit"]["method"] == "cross-fit"
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "tt12"),
            "--pairs", "train-train", "--runs", "12")
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(lab), "--train-kernel", str(tmp_path / "tt12"), check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"kernelscale: error: {tmp_path / 'tt12'}: runs 12 differs from the test kernel's 24"]
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(lab), "--train-kernel", str(tmp_path / "k"), check=False)
    assert p.returncode == 2 and "needs a train-train kernel" in p.stderr


def test_a_kernel_of_another_store_names_that_store(tmp_path, small_store):
    from tests.conftest import ingest_dir
    from tests.reference import labels_file

    store, *_ = small_store
    other = tmp_path / "other"
    ingest_dir(tmp_path / "src", other, max_files=2, show_progress=False)
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    run_cli("kernel", "--store", str(other), "--out", str(tmp_path / "k"))
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(lab), check=False)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"kernelscale: error: {tmp_path / 'k'}: was computed from the "
                           f"store {other.resolve()}, not {store} ")
    assert f"kernelscale kernel --store {store} --out {tmp_path / 'k'} --overwrite" in line


def test_ablation_kernels_are_the_class_and_raw_logit_kernels(tmp_path, small_store):
    from kernelscale.evaluation import ablation_kernels, evaluate, open_inputs
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.kernelread import load_kernel
    from kernelscale.labels import load_labels
    from tests.reference import labels_file, reference_kernel

    store, test, train = small_store
    compute_kernel(KernelConfig(store=store, out=tmp_path / "k", device="cpu",
                                show_progress=False))
    labels = load_labels(str(labels_file(tmp_path / "labels.npz", 96, 40, 5)))
    made = ablation_kernels(open_inputs(store, tmp_path / "k", labels), tmp_path / "abl",
                            device="cpu")
    assert [n for n, _ in made] == [f"class-{c}" for c in range(5)] + ["no-log-softmax"]
    for name, path in made:
        K = load_kernel(path).array[...]
        if name == "no-log-softmax":
            ref = reference_kernel(test, train, log_softmax=False)
        else:
            ref = reference_kernel(test, train, classes=[int(name.split("-")[1])])
        assert np.abs(K - ref).max() <= 1e-5, name
    res = evaluate(str(store), str(tmp_path / "k"), labels, ablations_dir=tmp_path / "abl")
    assert [a.name for a in res.ablations] == [n for n, _ in made]
    y = np.load(tmp_path / "labels.npz")
    for a in res.ablations:
        assert a.class_index == (int(a.name.split("-")[1]) if a.name.startswith("class-")
                                 else None)
        K = load_kernel(a.path).array[...]
        scores = ref_scores(K, y["train"], 3, "none", None, 5)
        ref = np.mean(np.asarray([int(np.argmax(s)) for s in scores]) == y["test"]) * 100
        assert a.accuracy == pytest.approx(ref)
    assert [a["name"] for a in res.as_json()["ablations"]] == [n for n, _ in made]


# --------------------------------------------------------------- JSON and provenance

def all_floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_floats(v)


def significant_digits(x: float) -> int:
    """Significant digits of the shortest text of ``x``: 85.39999999999999 has 16."""
    mantissa = repr(abs(x)).split("e")[0].replace(".", "")
    return len(mantissa.strip("0")) or 1


def assert_rounded(doc):
    """Every float of a JSON document has at most 7 significant digits."""
    floats = [x for x in all_floats(doc) if math.isfinite(x)]
    assert floats
    bad = [x for x in floats if significant_digits(x) > 7]
    assert not bad, bad[:5]


def test_evaluation_json_is_rounded_typed_and_not_duplicated():
    from kernelscale.evaluation import Evaluation
    from kernelscale.knn import Choice, Selection, oracle

    rng = np.random.default_rng(8)
    table = Candidates([Setting(1), Setting(3), Setting(5, "power", 2.0)],
                       rng.random((3, 7)) < 0.5)  # accuracies in sevenths: long decimals
    cf = crossfit(table, seed=1)
    orc = oracle(table)
    assert isinstance(cf, Selection) and isinstance(orc, Choice)
    # the typed results survive a JSON round trip
    assert Selection.from_json(json.loads(json.dumps(cf.as_json()))) == cf
    assert Choice.from_json(json.loads(json.dumps(orc.as_json()))) == orc
    ev = Evaluation(2, 3, 85.39999999999999, 100 / 3, 200 / 3, {}, setting=Setting(3),
                    weighted_accuracy=200 / 3, selection=cf, crossfit=cf, oracle=orc,
                    per_run_accuracy=[100 / 3, 137.39999999999999 - 52])
    d = ev.as_json()
    assert d["single_model_accuracy"] == 85.4 and d["ensemble_accuracy"] == 33.3333
    assert "per_run_accuracy" not in d  # every run's accuracy only when asked
    assert "crossfit" not in d and d["selection"]["method"] == "cross-fit"
    assert d["selection"]["folds"][0]["setting"] == cf.folds[0].setting.as_json()
    assert_rounded(d)
    full = ev.as_json(per_run=True)
    assert full["per_run_accuracy"] == [33.3333, 85.4]
    assert_rounded(full)
    # beside another selection the cross-fit is its own section
    ev.selection = Selection("leave-one-out", Setting(1), 50.0, selection_accuracy=100 / 7,
                             selection_rows=7)
    d = ev.as_json()
    assert d["selection"]["method"] == "leave-one-out"
    assert d["crossfit"]["method"] == "cross-fit"
    assert d["selection"]["selection_accuracy"] == 14.2857
    assert "neighbours" not in d and "folds" not in d["selection"]


def test_results_json_rounded_without_runs_with_provenance(tmp_path, small_store):
    import torch

    from kernelscale import __version__
    from kernelscale.kernelread import load_kernel
    from kernelscale.store import Store
    from tests.reference import labels_file

    store, *_ = small_store
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"), "--device", "cpu")
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    args = ("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"), "--labels",
            str(lab), "--select", "--json")
    d = json.loads(run_cli(*args).stdout)
    assert "per_run_accuracy" not in d and "crossfit" not in d
    assert_rounded(d)
    prov = d["provenance"]
    assert prov["store"] == str(store.resolve())
    assert prov["store_fingerprint"] == Store.open(store).fingerprint()
    assert prov["kernel"] == str((tmp_path / "k").resolve())
    assert prov["kernel_identity"] == load_kernel(tmp_path / "k").attrs["identity"]
    assert prov["kernel_identity"]["store_fingerprint"] == prov["store_fingerprint"]
    assert Path(prov["labels"]).resolve() == lab.resolve()
    assert prov["kernelscale_version"] == __version__
    assert prov["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert prov["numpy_version"] == np.__version__
    assert prov["device"] == "cpu"  # from the kernel's done-markers
    assert prov["command"].startswith("kernelscale -q evaluate --store ")
    assert "--select" in prov["command"]
    assert prov["created_at"].endswith("Z")
    full = json.loads(run_cli(*args, "--per-run").stdout)
    assert len(full["per_run_accuracy"]) == 24
    assert_rounded(full)
    assert np.mean(full["per_run_accuracy"]) == pytest.approx(full["single_model_accuracy"],
                                                              abs=1e-3)
    assert {k: v for k, v in full.items() if k not in ("per_run_accuracy", "provenance")} \
        == {k: v for k, v in d.items() if k != "provenance"}


# ------------------------------------------------------------------------------ the curve

def test_crossover_rule():
    from kernelscale.curve import CurvePoint, crossover
    from kernelscale.knn import Choice, Selection

    def pts(*pairs):
        sel, orc = Selection("cross-fit", None, 0.0), Choice(Setting(1), 0.0)
        return [CurvePoint(n, 0.0, e, k, sel, orc)
                for n, (e, k) in zip((5, 10, 20, 50, 100), pairs, strict=False)]

    assert crossover(pts((80, 70), (80, 81), (80, 79), (80, 82), (80, 85))) == 50
    assert crossover(pts((80, 70), (80, 81), (80, 82), (80, 83), (80, 85))) == 10
    assert crossover(pts((80, 70), (80, 81), (80, 82), (80, 83), (80, 80))) is None
    assert crossover([]) is None


def test_parse_runs_errors():
    from kernelscale.curve import run_counts
    from kernelscale.errors import ConfigError

    assert run_counts("50, 10,all,10", 60) == [10, 50, 60]
    assert run_counts([5, "all"], 8) == [5, 8]
    for bad, msg in (("1", "at least 2"), ("70", r"outside \[2, 60\]"), ("x", "not a number"),
                     ("", "no run counts")):
        with pytest.raises(ConfigError, match=msg):
            run_counts(bad, 60)


def test_curve_ensemble_ahead_at_few_runs_kernel_ahead_at_many(tmp_path):
    from kernelscale.curve import Curve, load_curve

    run_cli("simulate", "--out", str(tmp_path / "sim"), "--runs", "160", "--files", "2", "--n-train",
            "1000", "--n-test", "300", "--seed", "1")
    run_cli("ingest", str(tmp_path / "sim"), "--store", str(tmp_path / "store"))
    p = run_cli("curve", "--store", str(tmp_path / "store"), "--labels",
                str(tmp_path / "sim" / "labels.npz"), "--runs", "4,20,all", "--out",
                str(tmp_path / "curve"), "--device", "cpu")
    doc = load_curve(tmp_path / "curve" / "curve.json")
    pts = {p.runs: p for p in doc.points}
    assert sorted(pts) == [4, 20, 160]
    assert pts[4].ensemble_accuracy > pts[4].knn_accuracy + 5
    assert pts[160].knn_accuracy > pts[160].ensemble_accuracy + 1
    assert doc.crossover == 160
    assert all(p.selected.method == "cross-fit" and len(p.selected.folds) == 2
               for p in doc.points)
    assert "crossover: 3-NN ahead of the ensemble from 160 runs on" in p.stdout
    assert not list((tmp_path / "curve").glob("kernel-runs-*"))  # not kept by default
    # the ensemble accuracy of a prefix is the one of those runs' mean logits
    import torch
    files = sorted((tmp_path / "sim").rglob("log.pt"))
    te = torch.cat([torch.load(f, weights_only=True)["logits"] for f in files])
    y = torch.from_numpy(np.load(tmp_path / "sim" / "labels.npz")["test"])
    for n in (4, 20, 160):
        ens = (te[:n].mean(0).argmax(1) == y).float().mean().item() * 100
        assert pts[n].ensemble_accuracy == pytest.approx(ens, abs=1e-4)
    # a second call resumes: nothing recomputed (the measured kernel times are the same)
    run_cli("curve", "--store", str(tmp_path / "store"), "--labels",
            str(tmp_path / "sim" / "labels.npz"), "--runs", "4,20,all", "--out",
            str(tmp_path / "curve"), "--device", "cpu")
    again = load_curve(tmp_path / "curve" / "curve.json")
    assert again.points == doc.points
    # curve.json: rounded, one provenance, no per-run arrays
    raw = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert_rounded(raw)
    assert Curve.from_json(raw) == again and again.as_json() == raw
    prov = raw["provenance"]
    assert prov["store_fingerprint"] == doc.store_fingerprint == raw["store_fingerprint"]
    assert prov["kernel"] is None and prov["device"] == "cpu"
    assert prov["command"].startswith("kernelscale -q curve --store ")
    assert not any(isinstance(v, list) for p in raw["points"] for v in p.values())


@pytest.mark.fault
def test_labels_as_a_single_npy_array_get_one_clear_line(tmp_path):
    from kernelscale.errors import BadInputError
    from kernelscale.labels import load_labels

    np.save(tmp_path / "labels.npy", np.zeros(10, dtype=np.int64))
    with pytest.raises(BadInputError, match="a single .npy array; labels are an .npz"):
        load_labels(str(tmp_path / "labels.npy"))
