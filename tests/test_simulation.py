"""The simulator: the Hub's layout, determinism, and the phenomena of a real ensemble.

The kernel here is an independent float64 numpy transcription of the definition
(log_softmax, z-score over runs with n-1, mean over runs and classes), so these tests
do not lean on :mod:`kernelscale.kernel`.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelscale import simulation as sim
from kernelscale.simulation import SUBDIR, SimulationError, SimulationSummary, simulate

SMALL = dict(runs=7, files=3, n_train=40, n_test=20, classes=4, seed=3, progress=False)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def read_all(out: Path, files=None) -> tuple[np.ndarray, np.ndarray]:
    """float64 test (R, n_test, C) and train (R, n_train, C); files in sorted path order."""
    files = files if files is not None else sorted((out / SUBDIR).glob("*/log.pt"))
    logs = [load(p) for p in files]
    test = np.concatenate([d["logits"].double().numpy() for d in logs])
    train = np.concatenate([d["logits_train"].double().numpy() for d in logs])
    return test, train


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ reference (float64)

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def zscore(logits: np.ndarray) -> np.ndarray:
    x = log_softmax(logits.astype(np.float64))
    return (x - x.mean(0)) / x.std(0, ddof=1)


def ref_kernel(test: np.ndarray, train: np.ndarray) -> np.ndarray:
    """K[i, j] = 1/C sum_c 1/R sum_r z_test[r,i,c] z_train[r,j,c]; (n_test, n_train)."""
    R, _, C = test.shape
    zt = zscore(test).transpose(1, 0, 2).reshape(test.shape[1], R * C)
    zr = zscore(train).transpose(1, 0, 2).reshape(train.shape[1], R * C)
    return zt @ zr.T / (R * C)


def knn3(K: np.ndarray, y_train: np.ndarray, classes: int) -> np.ndarray:
    nb = np.argsort(-K, axis=1, kind="stable")[:, :3]
    counts = np.stack([(y_train[nb] == c).sum(1) for c in range(classes)], 1)
    return counts.argmax(1)  # ties to the smallest label, as torch.mode does


# ------------------------------------------------------------------------ layout

def test_layout_dtypes_and_shapes(tmp_path):
    out = tmp_path / "sim"
    s = simulate(out, **SMALL)
    assert isinstance(s, SimulationSummary)
    assert (s.out, s.runs, s.n_train, s.n_test, s.classes, s.seed) == (out, 7, 40, 20, 4, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.runs = 8  # type: ignore[misc]

    assert len(s.files) == 3
    assert sorted(s.files) == sorted((out / SUBDIR).glob("*/log.pt"))
    for p in s.files:
        assert p.name == "log.pt" and p.parent.parent == out / SUBDIR
        u = uuid.UUID(p.parent.name)
        assert u.version == 4 and str(u) == p.parent.name
    # atomic writes leave no temporaries behind
    assert set(tree_bytes(out)) == {"labels.npz"} | {p.relative_to(out).as_posix()
                                                     for p in s.files}

    sizes = []
    for p in s.files:
        d = load(p)
        assert set(d) == {"logits", "logits_train", "code"}
        assert d["logits"].dtype == torch.float16 and d["logits_train"].dtype == torch.float16
        r = d["logits"].shape[0]
        assert d["logits"].shape == (r, 20, 4) and d["logits_train"].shape == (r, 40, 4)
        assert torch.isfinite(d["logits"]).all() and torch.isfinite(d["logits_train"]).all()
        assert isinstance(d["code"], str) and "seed=3" in d["code"]
        sizes.append(r)
    assert sizes == [3, 2, 2]  # generation order, remainder to the first files

    with np.load(out / "labels.npz", allow_pickle=False) as z:
        assert set(z.files) == {"train", "test", "class_names"}
        assert z["train"].dtype == np.int64 and z["train"].shape == (40,)
        assert z["test"].dtype == np.int64 and z["test"].shape == (20,)
        assert z["train"].min() >= 0 and z["train"].max() < 4
        assert z["test"].min() >= 0 and z["test"].max() < 4
        assert z["class_names"].dtype.kind == "U"
        assert z["class_names"].tolist() == ["sim-0", "sim-1", "sim-2", "sim-3"]


@pytest.mark.parametrize("classes,names", [
    (2, ["sim-0", "sim-1"]), (100, ["sim-00", "sim-01", "sim-99"]),
    (1000, ["sim-000", "sim-001", "sim-999"]),
])
def test_any_class_count(tmp_path, classes, names):
    s = simulate(tmp_path, runs=3, files=2, n_train=400, n_test=60, classes=classes, seed=1,
                 progress=False)
    assert s.classes == classes
    test, train = read_all(tmp_path, s.files)
    assert test.shape == (3, 60, classes) and train.shape == (3, 400, classes)
    assert np.isfinite(test).all() and np.isfinite(train).all()
    with np.load(tmp_path / "labels.npz", allow_pickle=False) as z:
        y_train, y_test, got = z["train"], z["test"], z["class_names"].tolist()
    assert len(got) == classes and len(set(got)) == classes
    assert (got if classes == 2 else [got[0], got[1], got[-1]]) == names
    assert y_train.min() >= 0 and y_train.max() < classes and y_test.max() < classes
    # labels are spread over the classes (uniform draws), not stuck below ten
    assert len(np.unique(y_train)) >= 0.9 * classes * (1 - (1 - 1 / classes) ** 400)
    # memorised: every run's train argmax is the label; test above chance, below train
    assert (train.argmax(-1) == y_train).mean() > 0.95
    single = (test.argmax(-1) == y_test).mean()
    assert 1.5 / classes < single < 0.95


def test_cli_simulate_any_class_count(tmp_path):
    from tests.conftest import run_cli

    p = run_cli("simulate", "--out", str(tmp_path / "s"), "--runs", "2", "--files", "1",
                "--n-train", "30", "--n-test", "10", "--classes", "100")
    assert "classes 100" in p.stdout and "labels.npz" in p.stdout
    assert load(next((tmp_path / "s" / SUBDIR).glob("*/log.pt")))["logits"].shape == (2, 10, 100)
    p = run_cli("simulate", "--out", str(tmp_path / "t"), "--classes", "1", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["kernelscale: error: classes must be >= 2, got 1"]


@pytest.mark.parametrize("runs,files", [(1, 1), (5, 5), (10, 3), (11, 4), (200, 2)])
def test_runs_split_evenly(tmp_path, runs, files):
    s = simulate(tmp_path, runs=runs, files=files, n_train=6, n_test=3, classes=3,
                 progress=False)
    sizes = [load(p)["logits"].shape[0] for p in s.files]
    assert sum(sizes) == runs and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_generates_one_file_at_a_time(tmp_path, monkeypatch):
    batches = []
    real = sim._runs

    def spy(seed, start, stop, data):
        batches.append(stop - start)
        return real(seed, start, stop, data)

    monkeypatch.setattr(sim, "_runs", spy)
    simulate(tmp_path, runs=10, files=4, n_train=6, n_test=3, classes=3, progress=False)
    assert batches == [3, 3, 2, 2]


@pytest.mark.parametrize("bad", [
    dict(runs=2, files=3), dict(runs=0), dict(files=0), dict(n_train=0), dict(n_test=0),
    dict(classes=1), dict(seed=-1), dict(runs=2.5), dict(files=True),
])
def test_invalid_arguments(tmp_path, bad):
    args = {**SMALL, **bad}
    with pytest.raises(SimulationError) as e:
        simulate(tmp_path / "sim", **args)
    assert isinstance(e.value, ValueError)
    assert not (tmp_path / "sim").exists()


def test_refuses_folder_of_another_simulation(tmp_path):
    simulate(tmp_path, **SMALL)
    before = tree_bytes(tmp_path)
    simulate(tmp_path, **SMALL)  # same arguments: rewritten in place, identical
    assert tree_bytes(tmp_path) == before
    with pytest.raises(SimulationError, match="another"):
        simulate(tmp_path, **{**SMALL, "seed": 4})
    assert tree_bytes(tmp_path) == before


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    simulate(tmp_path, **{**SMALL, "progress": True})
    cap = capsys.readouterr()
    assert "simulate" in cap.err and cap.out == ""


# ------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (simulate(tmp_path / n, **{**SMALL, "seed": s})
               for n, s in (("a", 3), ("b", 3), ("c", 4)))
    ta, tb, tc = (tree_bytes(s.out) for s in (a, b, c))
    assert ta == tb
    assert not set(ta) & set(tc) - {"labels.npz"}  # other uuids
    for pa, pc in zip(a.files, c.files, strict=True):
        assert not torch.equal(load(pa)["logits"], load(pc)["logits"])


def test_runs_do_not_depend_on_the_file_split(tmp_path):
    one = simulate(tmp_path / "one", **{**SMALL, "files": 1})
    three = simulate(tmp_path / "three", **SMALL)
    t1, r1 = read_all(one.out, one.files)
    t3, r3 = read_all(three.out, three.files)  # summary.files: generation order
    np.testing.assert_array_equal(t1, t3)
    np.testing.assert_array_equal(r1, r3)


# -------------------------------------------------------------------- phenomena

@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """The default small shape: 200 runs, 2000 train, 500 test, 10 classes."""
    out = tmp_path_factory.mktemp("ensemble")
    simulate(out, runs=200, files=2, progress=False)
    test, train = read_all(out)
    with np.load(out / "labels.npz") as z:
        y_train, y_test = z["train"], z["test"]
    K = ref_kernel(test, train)
    return test, train, y_train, y_test, K


def test_ensemble_beats_single_models(ensemble):
    test, train, y_train, y_test, _ = ensemble
    single = (test.argmax(-1) == y_test).mean()
    ens = (test.mean(0).argmax(-1) == y_test).mean()
    assert 0.6 < single < 0.95
    assert ens >= single + 0.01
    assert (train.argmax(-1) == y_train).mean() > 0.97  # memorised


def test_kernel_knn_below_ensemble_at_few_runs_above_at_many(ensemble):
    test, train, y_train, y_test, K = ensemble
    ens = (test.mean(0).argmax(-1) == y_test).mean()
    for r in (5, 10):
        knn = (knn3(ref_kernel(test[:r], train[:r]), y_train, 10) == y_test).mean()
        ens_r = (test[:r].mean(0).argmax(-1) == y_test).mean()
        assert knn < min(ens, ens_r), r
    knn = (knn3(K, y_train, 10) == y_test).mean()
    assert knn >= ens + 0.01


def test_near_duplicates_stand_out(ensemble):
    _, _, y_train, y_test, K = ensemble
    top = np.sort(K, axis=1)[:, ::-1]
    # a near-duplicate's row peaks at its source, far above the second best
    dup = top[:, 0] > 2 * top[:, 1]
    assert 0.07 <= dup.mean() <= 0.13
    src = K[dup].argmax(1)
    assert len(np.unique(src)) == len(src)
    assert (y_train[src] == y_test[dup]).mean() >= 0.98
    # and nothing else comes close to that
    assert np.all(top[~dup, 0] < 1.8 * top[~dup, 1])
