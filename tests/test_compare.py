"""``kernelscale compare`` against an independent numpy computation of the same metrics.

Two simulated configurations over the same examples: ``random_source`` with different
seeds (stores and kernels differ, shapes and labels are the same). The reference reads
both full kernels whole with Zarr and recomputes everything in numpy alone: top-k sets by
(value descending, column ascending), Jaccard with Python sets, Spearman from average
ranks built per row with ``np.unique``, the majority vote with ``np.bincount``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from kernelscale import compare as cmpmod
from kernelscale.compare import compare_kernels
from kernelscale.errors import BadInputError, ConfigError, KernelOutputError
from kernelscale.kernel import KernelConfig, compute_kernel
from kernelscale.labels import load_labels
from kernelscale.similarity import jaccard_rows, rank_rows, spearman_rows
from tests.conftest import ingest_dir, run_cli
from tests.reference import labels_file, random_source

N_TEST, N_TRAIN, CLASSES = 40, 96, 5


# ------------------------------------------------------------------- the reference

def ref_top(K: np.ndarray, k: int, square: bool = False) -> np.ndarray:
    """Columns int (n, k) of each row's k largest values, ties to the smaller column."""
    K = np.array(K, dtype=np.float64)
    if square:
        np.fill_diagonal(K, -np.inf)
    return np.array([sorted(range(K.shape[1]), key=lambda j: (-K[i, j], j))[:k]
                     for i in range(K.shape[0])])


def ref_ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (1 = smallest) of a 1-D array."""
    u, inv, cnt = np.unique(v, return_inverse=True, return_counts=True)
    hi = np.cumsum(cnt)
    return ((hi - cnt + 1 + hi) / 2)[inv]


def ref_spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(ref_ranks(x), ref_ranks(y))[0, 1])


def ref_vote(cols: np.ndarray, train: np.ndarray) -> np.ndarray:
    return np.array([np.bincount(train[c], minlength=CLASSES).argmax() for c in cols])


def read_full(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["kernel"][...]


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Two configurations (seeds 0 and 1) of the same examples: full test x train kernels
    with different chunk rows, their top-20 kernels, square train x train kernels, and
    one labels file."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, seed, chunks in (("a", 0, (16, 32)), ("b", 1, (12, 64))):
        random_source(root / f"src-{name}", [6, 7], n_test=N_TEST, n_train=N_TRAIN,
                      classes=CLASSES, seed=seed)
        store = root / f"store-{name}"
        ingest_dir(root / f"src-{name}", store, show_progress=False)
        for kind, kw in (("full", {}), ("top", {"topk": 20}),
                         ("sq", {"pairs": "train-train"}),
                         ("sqtop", {"pairs": "train-train", "topk": 12})):
            path = root / f"{name}-{kind}"
            compute_kernel(KernelConfig(store=store, out=path, chunks=chunks,
                                        show_progress=False, device="cpu", **kw))
            out[f"{name}-{kind}"] = path
    out["labels"] = labels_file(root / "labels.npz", N_TRAIN, N_TEST, CLASSES, seed=7)
    out["root"] = root
    return out


# --------------------------------------------------------------------- row metrics

def test_ranks_and_spearman_with_ties_and_missing_entries():
    x = np.array([[3.0, 1.0, 2.0, 2.0], [5.0, np.nan, 5.0, 1.0]])
    assert rank_rows(x)[0].tolist() == [4.0, 1.0, 2.5, 2.5]
    r1 = rank_rows(x)[1]
    assert np.isnan(r1[1]) and r1[[0, 2, 3]].tolist() == [2.5, 2.5, 1.0]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    b = a + rng.normal(size=a.shape)
    want = [ref_spearman(a[i], b[i]) for i in range(6)]
    np.testing.assert_allclose(spearman_rows(a, b), want, atol=1e-12)
    b[2, 5] = np.nan  # left out of row 2 on both sides
    keep = np.arange(30) != 5
    assert spearman_rows(a, b)[2] == pytest.approx(ref_spearman(a[2, keep], b[2, keep]))
    assert np.isnan(spearman_rows(np.ones((1, 4)), b[:1, :4]))[0]  # a constant row
    sets = jaccard_rows(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]]))
    assert sets.tolist() == [2 / 4, 0.0]


# ---------------------------------------------------------------- whole comparisons

def test_a_kernel_compared_with_itself_agrees_everywhere(configs):
    labels = load_labels(str(configs["labels"]))
    c = compare_kernels(configs["a-full"], configs["a-full"], labels=labels, k=10)
    assert [o.k for o in c.overlap] == [1, 3, 10, 50]
    assert all(o.mean_jaccard == 1.0 and o.identical_rows == 100.0 for o in c.overlap)
    assert c.same_nearest == 100.0
    assert c.rank.method == "exact" and c.rank.mean == pytest.approx(1.0)
    assert c.rank.rows == N_TEST and c.rank.entries == N_TRAIN and c.rank.undefined == 0
    assert c.knn.agreement == 100.0 and c.knn.accuracy_a == c.knn.accuracy_b
    assert c.knn.only_a_right == c.knn.only_b_right == 0 and c.disagreements == []


def test_two_configurations_match_numpy(configs, monkeypatch):
    # tiny blocks: several per kernel, and B's chunk rows (12) do not divide A's (16),
    # so B is also read across its chunk boundaries
    monkeypatch.setattr(cmpmod, "BLOCK_BYTES", 1)
    labels = load_labels(str(configs["labels"]))
    c = compare_kernels(configs["a-full"], configs["b-full"], labels=labels, k=10,
                        workers=2)
    A, B = read_full(configs["a-full"]), read_full(configs["b-full"])
    for o in c.overlap:
        ta, tb = ref_top(A, o.k), ref_top(B, o.k)
        jac = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ta, tb, strict=True)]
        assert o.mean_jaccard == pytest.approx(np.mean(jac), abs=1e-12)
        assert o.median_jaccard == pytest.approx(np.median(jac), abs=1e-12)
        assert o.identical_rows == pytest.approx(np.mean(np.array(jac) == 1) * 100)
    assert 0 < c.overlap[2].mean_jaccard < 1  # the two configurations do differ
    assert c.same_nearest == pytest.approx(np.mean(ref_top(A, 1)[:, 0] == ref_top(B, 1)[:, 0])
                                           * 100)
    rho = [ref_spearman(A[i], B[i]) for i in range(N_TEST)]
    assert c.rank.method == "exact"
    assert c.rank.mean == pytest.approx(np.mean(rho), abs=1e-9)
    assert c.rank.median == pytest.approx(np.median(rho), abs=1e-9)
    assert c.rank.p10 == pytest.approx(np.percentile(rho, 10), abs=1e-9)
    with np.load(configs["labels"]) as z:
        train, test = z["train"], z["test"]
    for i, k in enumerate(c.knn.ks):
        pa, pb = ref_vote(ref_top(A, k), train), ref_vote(ref_top(B, k), train)
        assert c.knn.by_k_a[i] == pytest.approx(np.mean(pa == test) * 100)
        assert c.knn.by_k_b[i] == pytest.approx(np.mean(pb == test) * 100)
    pa, pb = ref_vote(ref_top(A, 10), train), ref_vote(ref_top(B, 10), train)
    assert c.knn.accuracy_a == pytest.approx(np.mean(pa == test) * 100)
    assert c.knn.agreement == pytest.approx(np.mean(pa == pb) * 100)
    assert c.knn.both_right == int(((pa == test) & (pb == test)).sum())
    assert c.knn.only_b_right == int(((pa != test) & (pb == test)).sum())
    j10 = np.array([len(set(x) & set(y)) / len(set(x) | set(y))
                    for x, y in zip(ref_top(A, 10), ref_top(B, 10), strict=True)])
    differ = sorted(np.flatnonzero(pa != pb), key=lambda r: (j10[r], r))
    assert differ, "the two configurations should disagree somewhere"
    assert [d.row for d in c.disagreements] == differ[:cmpmod.DISAGREEMENTS]
    d = c.disagreements[0]
    assert (d.label, d.pred_a, d.pred_b) == (test[d.row], pa[d.row], pb[d.row])
    assert d.jaccard == pytest.approx(j10[d.row])


def test_sampled_rank_correlation_states_its_rows_and_seed(configs):
    c = compare_kernels(configs["a-full"], configs["b-full"], sample=10, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(N_TEST, 10, replace=False))
    A, B = read_full(configs["a-full"]), read_full(configs["b-full"])
    assert c.rank.method == "sample" and c.rank.rows == 10 and c.rank.seed == 3
    assert "10 random rows of 40 (seed 3)" in c.rank.description
    assert c.rank.mean == pytest.approx(np.mean([ref_spearman(A[i], B[i]) for i in rows]))
    every = compare_kernels(configs["a-full"], configs["b-full"], sample=N_TEST)
    assert every.rank.method == "exact"


def test_full_against_top_k(configs):
    same = compare_kernels(configs["a-full"], configs["a-top"], k=10)
    assert [o.k for o in same.overlap] == [1, 3, 10]  # 50 > the 20 held
    assert all(o.mean_jaccard == 1.0 for o in same.overlap)
    assert same.rank.method == "neighbours" and same.rank.mean == pytest.approx(1.0)
    assert same.rank.entries == 20 and "stored neighbours in B (top-20)" in same.rank.description

    c = compare_kernels(configs["a-full"], configs["b-top"], k=10)
    A, B = read_full(configs["a-full"]), read_full(configs["b-full"])
    tb = ref_top(B, 20)
    rho = [ref_spearman(B[i, tb[i]], A[i, tb[i]]) for i in range(N_TEST)]
    assert c.rank.mean == pytest.approx(np.mean(rho), abs=1e-9)
    full = compare_kernels(configs["a-full"], configs["b-full"], k=10)
    assert [o.mean_jaccard for o in c.overlap] == [o.mean_jaccard for o in full.overlap[:3]]

    both = compare_kernels(configs["a-top"], configs["b-top"], k=10)
    assert both.rank.method == "none" and "only the neighbour overlap" in both.rank.description
    assert [o.mean_jaccard for o in both.overlap] == [o.mean_jaccard for o in c.overlap]
    assert both.as_json()["rank_correlation"]["mean"] is None  # no NaN in the JSON
    with pytest.raises(ConfigError, match="at most 20 neighbours"):
        compare_kernels(configs["a-full"], configs["b-top"], k=21)


def test_square_kernels_leave_out_the_own_column(configs):
    A, B = read_full(configs["a-sq"]), read_full(configs["b-sq"])
    c = compare_kernels(configs["a-sq"], configs["b-sqtop"], k=3)
    for o in c.overlap:
        ta, tb = ref_top(A, o.k, square=True), ref_top(B, o.k, square=True)
        jac = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ta, tb, strict=True)]
        assert o.mean_jaccard == pytest.approx(np.mean(jac), abs=1e-12)
    exact = compare_kernels(configs["a-sq"], configs["b-sq"], k=3)
    keep = ~np.eye(N_TRAIN, dtype=bool)
    rho = [ref_spearman(A[i, keep[i]], B[i, keep[i]]) for i in range(N_TRAIN)]
    assert exact.rank.entries == N_TRAIN - 1
    assert exact.rank.mean == pytest.approx(np.mean(rho), abs=1e-9)


def test_kernels_over_other_examples_or_labels_are_refused(configs, tmp_path):
    with pytest.raises(KernelOutputError, match="same pairs"):
        compare_kernels(configs["a-full"], configs["b-sq"])
    bad = labels_file(tmp_path / "bad.npz", N_TRAIN + 1, N_TEST, CLASSES)
    with pytest.raises(BadInputError, match="97 train labels"):
        compare_kernels(configs["a-full"], configs["b-full"],
                        labels=load_labels(str(bad)))
    # a store of fewer train examples: a kernel of another shape, one line from the CLI
    random_source(tmp_path / "src", [5], n_test=N_TEST, n_train=80, classes=CLASSES)
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    compute_kernel(KernelConfig(store=tmp_path / "store", out=tmp_path / "k80",
                                show_progress=False, device="cpu"))
    p = run_cli("compare", str(configs["a-full"]), str(tmp_path / "k80"), check=False)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "40x96" in lines[0] and "40x80" in lines[0]
    assert lines[0].startswith("kernelscale: error:")


def test_cli_prints_the_table_and_writes_json_and_figure(configs, tmp_path):
    out = tmp_path / "cmp"
    p = run_cli("compare", str(configs["a-full"]), str(configs["b-top"]), "--labels",
                str(configs["labels"]), "--k", "5", "--out", str(out))
    assert "mean Jaccard" in p.stdout and "accuracy A" in p.stdout
    assert "where they disagree most" in p.stdout and str(out / "compare.json") in p.stdout
    doc = json.loads((out / "compare.json").read_text())
    assert doc["figure"] == "compare.png" and doc["k"] == 5
    assert doc["b"]["kind"] == "top-20" and doc["rank_correlation"]["method"] == "neighbours"
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temp left
    j = run_cli("compare", str(configs["a-full"]), str(configs["b-top"]), "--labels",
                str(configs["labels"]), "--k", "5", "--json")
    printed = json.loads(j.stdout)
    assert printed == {k: v for k, v in doc.items() if k != "figure"}


def test_cli_compares_a_hub_kernel_as_its_local_copy(configs, tmp_path, monkeypatch):
    """`kernelscale compare hf://... KERNEL_B`: the published kernel is fetched, verified
    and compared; the result is the local kernels' but for A's name, its spec."""
    from kernelscale.publish import PublishConfig, publish
    from tests.hubserver import HubServer, private_hf_home

    home = private_hf_home(tmp_path, monkeypatch)
    spec = "hf://datasets/me/cfg-a/a-full"
    with HubServer() as hub:
        publish(PublishConfig(configs["a-full"], "hf://datasets/me/cfg-a", create=True,
                              show_progress=False), endpoint=hub.url, token="hf_write")
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_XET": "1"}
        p = run_cli("compare", spec, str(configs["b-top"]), "--labels",
                    str(configs["labels"]), "--k", "5", "--json", env=env)
    remote = json.loads(p.stdout)
    local = compare_kernels(configs["a-full"], configs["b-top"], k=5,
                            labels=load_labels(str(configs["labels"]))).as_json()
    assert remote["a"].pop("path") == spec
    local["a"].pop("path")
    assert remote == json.loads(json.dumps(local))
    assert list(home.glob("hub/datasets--me--cfg-a/snapshots/*/a-full/zarr.json"))
