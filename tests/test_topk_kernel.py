"""Top-K kernels: each row's K largest values and their columns, never the full matrix.

The reference is the engine's own full kernel ranked by numpy (value descending, column
ascending, ``np.lexsort``): the top-K values must be its values bit for bit, and within
1e-5 of a float64 evaluation of the formula.
"""

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.errors import ConfigError, KernelOutputError
from kernelscale.kernel import KernelConfig, compute_kernel
from kernelscale.kernelread import kernel_neighbours, load_kernel
from kernelscale.topk import Neighbours, merge_neighbours, tile_neighbours
from tests.conftest import run_cli
from tests.reference import reference_kernel


def numpy_topk(K: np.ndarray, k: int, exclude_diagonal: bool = False):
    """Top-k of each row by (value descending, column ascending), in numpy alone."""
    K = np.array(K, dtype=np.float64)
    if exclude_diagonal:
        np.fill_diagonal(K, -np.inf)
    cols = np.broadcast_to(np.arange(K.shape[1]), K.shape)
    order = np.lexsort((cols, -K), axis=1)[:, :k]
    return np.take_along_axis(K, order, axis=1).astype(np.float32), order


def full(store, out, **kw):
    compute_kernel(KernelConfig(store=store, out=out, show_progress=False, **kw))
    return zarr.open_group(str(out), mode="r")["kernel"][...]


def topk(store, out, k, **kw):
    compute_kernel(KernelConfig(store=store, out=out, topk=k, show_progress=False, **kw))
    g = zarr.open_group(str(out), mode="r")
    return g["values"][...], g["indices"][...]


# ------------------------------------------------------------------------ pure merge

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_tiles_merged_in_any_order_equal_the_top_of_the_whole_row(data):
    n = data.draw(st.integers(1, 12))
    m = data.draw(st.integers(2, 40))
    square = data.draw(st.booleans()) and n <= m
    k = data.draw(st.integers(1, m - 1 if square else m))
    # few distinct values: ties everywhere, across tile edges too
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=n * m, max_size=n * m))
    K = np.array(vals, dtype=np.float32).reshape(n, m) / 4
    cuts = sorted(set(data.draw(st.lists(st.integers(1, m - 1), max_size=5))))
    edges = [0, *cuts, m]
    parts = [tile_neighbours(K[:, a:b].copy(), k, a, exclude_row0=0 if square else None)
             for a, b in zip(edges, edges[1:], strict=False)]
    order = data.draw(st.permutations(range(len(parts))))
    run = parts[order[0]]
    for i in order[1:]:
        run = merge_neighbours(run, parts[i], k)
    v, i = numpy_topk(K, k, exclude_diagonal=square)
    np.testing.assert_array_equal(run.index, i)
    np.testing.assert_array_equal(run.values, v)


def test_a_narrow_tile_holding_the_diagonal_leaves_an_empty_slot_that_loses():
    K = np.array([[5, 1, 2], [3, 9, 4]], dtype=np.float32)
    own = tile_neighbours(K[:, :2].copy(), 2, 0, exclude_row0=0)
    assert own.index.tolist() == [[1, -1], [0, -1]]
    merged = merge_neighbours(own, tile_neighbours(K[:, 2:].copy(), 2, 2, exclude_row0=0), 2)
    assert merged.index.tolist() == [[2, 1], [2, 0]]
    assert merged.values.tolist() == [[2, 1], [4, 3]]


# ------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("chunks,tile,k", [((16, 32), None, 5), ((16, 32), (16, 32), 5),
                                           ((8, 32), (24, 64), 96), ((40, 96), None, 1)])
def test_topk_kernel_is_the_top_of_the_full_kernel_bit_for_bit(small_store, tmp_path, chunks,
                                                               tile, k):
    store, test, train = small_store
    K = full(store, tmp_path / "full", chunks=chunks, tile=tile)
    v, i = topk(store, tmp_path / "top", k, chunks=chunks, tile=tile)
    rv, ri = numpy_topk(K, k)
    assert v.dtype == np.float32 and i.dtype == np.int64 and v.shape == (K.shape[0], k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)
    ref = reference_kernel(test, train)
    assert np.abs(v - np.take_along_axis(ref, i, axis=1)).max() <= 1e-5
    # merged partials and checkpoints are removed once the kernel is complete
    assert not (tmp_path / "top" / ".partial").exists()
    assert not (tmp_path / "top" / ".checkpoints").exists()


@pytest.mark.parametrize("pairs", ["train-train", "test-test"])
def test_square_topk_kernels_leave_out_the_own_column(small_store, tmp_path, pairs):
    store, *_ = small_store
    # the same tiles: a GEMM of another shape may round differently (by an ulp)
    K = full(store, tmp_path / "full", pairs=pairs, chunks=(16, 32), tile=(16, 32))
    m = K.shape[1]
    for k in (3, m - 1):  # m - 1: every other column; no empty slot may remain
        v, i = topk(store, tmp_path / f"top{k}", k, pairs=pairs, chunks=(16, 32),
                    tile=(16, 32))
        rv, ri = numpy_topk(K, k, exclude_diagonal=True)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v, rv)
        assert not (i == np.arange(len(i))[:, None]).any() and i.min() >= 0
    with pytest.raises(ConfigError, match="own column"):
        topk(store, tmp_path / "over", m, pairs=pairs)


def test_regions_computed_apart_merge_to_the_whole(small_store, tmp_path):
    store, *_ = small_store
    # the same tiles: a GEMM of another shape may round differently (by an ulp)
    whole = topk(store, tmp_path / "whole", 6, chunks=(16, 32), tile=(16, 32))
    out = tmp_path / "regions"
    for cols in ((64, 96), (0, 64)):
        for rows in ((16, 40), (0, 16)):
            compute_kernel(KernelConfig(store=store, out=out, topk=6, chunks=(16, 32),
                                        rows=rows, cols=cols, tile=(16, 32),
                                        show_progress=False))
            assert load_kernel(out, require_complete=False).attrs["complete"] is (
                cols == (0, 64) and rows == (0, 16))
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["values"][...], whole[0])
    np.testing.assert_array_equal(g["indices"][...], whole[1])


def test_bad_topk_requests_are_one_line(small_store, tmp_path):
    store, *_ = small_store
    with pytest.raises(ConfigError, match="at least 1"):
        topk(store, tmp_path / "a", 0)
    with pytest.raises(ConfigError, match="96 columns"):
        topk(store, tmp_path / "b", 97)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_topk_kernel_is_not_a_full_one(small_store, tmp_path):
    store, *_ = small_store
    topk(store, tmp_path / "top", 4, chunks=(16, 32))
    # the same path asked for a full kernel: another identity, refused without --overwrite
    with pytest.raises(KernelOutputError, match="--overwrite"):
        full(store, tmp_path / "top", chunks=(16, 32))
    k = load_kernel(tmp_path / "top")
    with pytest.raises(KernelOutputError, match="top-4"):
        k.array  # noqa: B018
    with pytest.raises(KernelOutputError, match="needs 5"):
        kernel_neighbours(k, 5)
    nb = kernel_neighbours(k, 3)
    assert nb.values.shape == (40, 3)


def test_neighbours_export_of_a_full_kernel_equals_the_computed_topk(small_store, tmp_path):
    store, *_ = small_store
    full(store, tmp_path / "full", chunks=(16, 32))
    v, i = topk(store, tmp_path / "top", 5, chunks=(16, 32))
    p = run_cli("neighbours", "--kernel", str(tmp_path / "full"), "--k", "5", "--out",
                str(tmp_path / "exported"))
    assert "neighbours:" in p.stdout
    nb = kernel_neighbours(load_kernel(tmp_path / "exported"), 5)
    np.testing.assert_array_equal(nb.values, v)
    np.testing.assert_array_equal(nb.index, i)
    # not over a folder that is not a kernel
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    p = run_cli("neighbours", "--kernel", str(tmp_path / "full"), "--k", "5", "--out",
                str(tmp_path / "mine"), "--overwrite", check=False)
    assert p.returncode != 0 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_merge_is_what_neighbours_of_both_halves_give():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((30, 50)).astype(np.float32)
    a = Neighbours(*numpy_topk(K[:, :20], 7))
    b = Neighbours(*numpy_topk(K[:, 20:], 7))
    b = Neighbours(b.values, b.index + 20)
    m = merge_neighbours(b, a, 7)
    rv, ri = numpy_topk(K, 7)
    np.testing.assert_array_equal(m.index, ri)
    np.testing.assert_array_equal(m.values, rv)


# ------------------------------------------------------------------------- consumers

def _evaluations(store, tmp_path, kernel, train_kernel, k=3):
    from kernelscale.evaluation import evaluate
    from kernelscale.knn import Grid
    from kernelscale.labels import load_labels
    from tests.reference import labels_file

    lab = load_labels(str(labels_file(tmp_path / "labels.npz", 96, 40, 5, seed=2)))
    grid = Grid(ks=(1, 2, 3, 5, 8))
    return evaluate(str(store), str(kernel), lab, k, weighting="power", power=4.0,
                    train_kernel=train_kernel, grid=grid)


def test_evaluate_on_topk_kernels_equals_evaluate_on_full_ones(small_store, tmp_path):
    store, *_ = small_store
    full(store, tmp_path / "full", chunks=(16, 32))
    full(store, tmp_path / "tfull", pairs="train-train", chunks=(16, 32))
    topk(store, tmp_path / "top", 8, chunks=(16, 32))
    topk(store, tmp_path / "ttop", 8, pairs="train-train", chunks=(16, 32))
    a = _evaluations(store, tmp_path, tmp_path / "full", tmp_path / "tfull").as_json()
    b = _evaluations(store, tmp_path, tmp_path / "top", tmp_path / "ttop").as_json()
    for d in (a, b):
        d.pop("provenance")
        d["selection"].pop("train_kernel")
    assert a == b
    assert a["selection"]["method"] == "leave-one-out"
    with pytest.raises(KernelOutputError, match="top-8 kernel holds 8 neighbours"):
        _evaluations(store, tmp_path, tmp_path / "top", None, k=9)
    # a test-train top-K kernel cannot stand for a train kernel, nor the other way round
    with pytest.raises(KernelOutputError):
        _evaluations(store, tmp_path, tmp_path / "ttop", None)


def _flip(path, at):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.fault
def test_a_damaged_merged_chunk_is_found_and_its_rows_recomputed(small_store, tmp_path):
    from tests.reference import labels_file

    store, *_ = small_store
    out = tmp_path / "top"
    args = ["kernel", "--store", str(store), "--out", str(out), "--topk", "6", "--chunks",
            "16x32", "--tile", "16x32", "-q"]
    run_cli(*args)
    assert not (out / ".partial").exists(), "merged partials are removed"
    v, i = topk(store, tmp_path / "clean", 6, chunks=(16, 32), tile=(16, 32))
    chunk = out / "values" / "c" / "1" / "0"  # rows 16:32
    _flip(chunk, 5)
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5, seed=2)
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(out), "--labels", str(lab),
                check=False)
    assert p.returncode != 0 and str(out / "values") in p.stderr
    p = run_cli("verify", str(out), check=False)
    assert p.returncode == 1 and str(chunk) in p.stdout
    p = run_cli("verify", str(out), "--repair", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli(*args)
    assert "tiles 3 (skipped 6)" in p.stdout  # the three tiles over rows 16:32 only
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["values"][...], v)
    np.testing.assert_array_equal(g["indices"][...], i)
    assert run_cli("verify", str(out)).returncode == 0


@pytest.mark.fault
def test_a_damaged_partial_of_an_unfinished_kernel_is_found_and_recomputed(small_store,
                                                                          tmp_path):
    store, *_ = small_store
    out = tmp_path / "top"
    args = ["kernel", "--store", str(store), "--out", str(out), "--topk", "6", "--chunks",
            "16x32", "--tile", "16x32", "-q"]
    run_cli(*args, "--rows", "0:16")
    v, i = topk(store, tmp_path / "clean", 6, chunks=(16, 32), tile=(16, 32))
    part = sorted((out / ".partial").glob("*.npz"))[1]
    _flip(part, part.stat().st_size // 3)
    p = run_cli("verify", str(out), check=False)
    assert p.returncode == 1 and str(part) in p.stdout
    assert run_cli("verify", str(out), "--repair", check=False).returncode == 0
    p = run_cli(*args)
    assert "tiles 7 (skipped 2)" in p.stdout  # the damaged tile and the rows not yet done
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["values"][...], v)
    np.testing.assert_array_equal(g["indices"][...], i)


def test_info_and_report_read_a_topk_kernel(small_store, tmp_path):
    from tests.reference import labels_file

    store, *_ = small_store
    out = tmp_path / "top"
    topk(store, out, 8, chunks=(16, 32))
    p = run_cli("info", str(out))
    assert "top-8 kernel" in p.stdout and "40 x 8" in p.stdout
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5, seed=2)
    p = run_cli("report", "--store", str(store), "--kernel", str(out), "--labels", str(lab),
                "--out", str(tmp_path / "report"), "--k", "3", check=False)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report" / "index.html").read_text().count("top-8") >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("pairs", ["test-train", "train-train"])
def test_cuda_topk_is_the_top_of_the_cuda_full_kernel(tmp_path, pairs):
    """On a GPU each tile is reduced on the device; the values are still the full
    kernel's (same device, same tiles) bit for bit."""
    from tests.conftest import ingest_dir
    from tests.reference import random_source

    test, train = random_source(tmp_path / "src", [200, 300], n_test=300, n_train=1000,
                                classes=10, seed=2)
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    kw = dict(device="cuda", pairs=pairs, chunks=(128, 256), tile=(256, 512))
    K = full(tmp_path / "store", tmp_path / "full", **kw)
    v, i = topk(tmp_path / "store", tmp_path / "top", 10, **kw)
    rv, ri = numpy_topk(K, 10, exclude_diagonal=pairs == "train-train")
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)
    if pairs == "test-train":
        ref = reference_kernel(test, train)
        assert np.abs(v - np.take_along_axis(ref, i, axis=1)).max() <= 1e-5
