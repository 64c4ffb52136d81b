import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernelscale import accumulate
from kernelscale.errors import (
    CheckpointMismatchError,
    ConfigError,
    KernelOutputError,
)
from kernelscale.kernel import KernelConfig, compute_kernel, create_output
from tests.conftest import ingest_dir
from tests.reference import random_source, reference_kernel, top_sets, write_log


def run(store, out, **kw):
    kw.setdefault("show_progress", False)
    compute_kernel(KernelConfig(store=store, out=out, **kw))
    return zarr.open_group(str(out), mode="r")["kernel"][...]


def test_kernel_matches_float64_reference(small_store, tmp_path):
    store, test, train = small_store
    K = run(store, tmp_path / "k")
    ref = reference_kernel(test, train)
    assert K.dtype == np.float32 and K.shape == ref.shape
    assert np.abs(K - ref).max() <= 1e-5
    assert top_sets(K) == top_sets(ref)


def test_prefix_runs_use_prefix_statistics(small_store, tmp_path):
    store, test, train = small_store
    K = run(store, tmp_path / "k", runs=11)  # ends inside the second file
    ref = reference_kernel(test[:11], train[:11])
    assert np.abs(K - ref).max() <= 1e-5
    attrs = zarr.open_group(str(tmp_path / "k"), mode="r").attrs
    assert attrs["runs"] == 11 and attrs["precision"] == "fp32"


def test_runs_beyond_store_is_an_error(small_store, tmp_path):
    store, *_ = small_store
    with pytest.raises(ConfigError, match="larger than the 24 runs"):
        run(store, tmp_path / "k", runs=25)
    assert not (tmp_path / "k").exists()


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cr=st.integers(1, 40), cc=st.integers(1, 96), tr=st.integers(1, 3), tc=st.integers(1, 3),
       run_chunk=st.integers(1, 24), budget_kb=st.sampled_from([None, 30, 200]),
       stage_chunks=st.integers(1, 3))
def test_tiled_equals_untiled(small_store, tmp_path_factory, monkeypatch, cr, cc, tr, tc,
                              run_chunk, budget_kb, stage_chunks):
    store, test, train = small_store
    # one-element chunks and tiles stay in, but not thousands of tiles (5 ms each)
    assume(-(-40 // (cr * tr)) * -(-96 // (cc * tc)) <= 400)
    # the final write's blocks: one chunk row by 1-3 chunks, so tiles span several blocks
    monkeypatch.setattr(accumulate, "STAGE_BYTES", stage_chunks * 4 * cr * cc)
    d = tmp_path_factory.mktemp("tiled")
    whole = run(store, d / "whole")
    kw = {"chunks": (cr, cc), "runs_per_step": run_chunk}
    if budget_kb is None:
        kw["tile"] = (tr * cr, tc * cc)
    else:
        kw["max_memory"] = budget_kb * 1024
    try:
        tiled = run(store, d / "tiled", **kw)
    except ConfigError as e:  # a budget below one chunk is a documented refusal
        assert "memory budget" in str(e)
        return
    np.testing.assert_allclose(tiled, whole, atol=2e-6, rtol=0)
    assert np.abs(tiled - reference_kernel(test, train)).max() <= 1e-5


def test_regions_assembled_equal_whole(small_store, tmp_path):
    """Regions of the same tiles give the whole kernel bit for bit (a Slurm array's
    tasks against one process); other tiles, to float32 rounding: the BLAS may sum a
    GEMM of another shape in another order."""
    store, test, train = small_store
    whole = run(store, tmp_path / "whole", chunks=(16, 32), tile=(16, 32))
    untiled = run(store, tmp_path / "untiled", chunks=(16, 32))
    out = tmp_path / "regions"
    for rows in ((0, 16), (16, 40)):
        for cols in ((0, 64), (64, 96)):
            run(store, out, chunks=(16, 32), rows=rows, cols=cols, tile=(16, 32))
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True
    np.testing.assert_array_equal(g["kernel"][...], whole)
    np.testing.assert_allclose(untiled, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole, reference_kernel(test, train), rtol=0, atol=1e-5)


def test_partial_region_leaves_kernel_incomplete(small_store, tmp_path):
    store, *_ = small_store
    run(store, tmp_path / "k", chunks=(16, 32), rows=(0, 16), cols=(0, 96))
    assert zarr.open_group(str(tmp_path / "k"), mode="r").attrs["complete"] is False


def test_misaligned_region_refused(small_store, tmp_path):
    store, *_ = small_store
    with pytest.raises(ConfigError, match="chunk grid"):
        run(store, tmp_path / "k", chunks=(16, 32), rows=(0, 10))


@pytest.mark.parametrize("pairs", ["train-train", "test-test"])
def test_square_kernels_symmetric_with_diagonal_r_minus_1_over_r(small_store, tmp_path, pairs):
    store, test, train = small_store
    K = run(store, tmp_path / "k", pairs=pairs, chunks=(32, 32))
    x = train if pairs == "train-train" else test
    R = x.shape[0]
    np.testing.assert_allclose(K, K.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(K), (R - 1) / R, atol=1e-5)
    assert np.abs(K - reference_kernel(x, x)).max() <= 1e-5


def test_ablations_match_reference(small_store, tmp_path):
    store, test, train = small_store
    K = run(store, tmp_path / "raw", log_softmax=False)
    assert np.abs(K - reference_kernel(test, train, log_softmax=False)).max() <= 1e-5
    K = run(store, tmp_path / "c2", classes=(2,))
    assert np.abs(K - reference_kernel(test, train, classes=[2])).max() <= 1e-5


def test_zero_variance_entries_give_zero_not_nan(tmp_path):
    rng = np.random.default_rng(3)
    te = rng.normal(size=(6, 10, 4)).astype(np.float16)
    tr = rng.normal(size=(6, 12, 4)).astype(np.float16)
    te[:, 3, :] = te[0, 3, :]  # example 3 identical in every run
    write_log(tmp_path / "src" / "a" / "log.pt", te, tr)
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    K = run(tmp_path / "store", tmp_path / "k")
    assert np.isfinite(K).all()
    assert (K[3] == 0).all()
    assert np.abs(K - reference_kernel(te, tr)).max() <= 1e-5
    attrs = zarr.open_group(str(tmp_path / "k"), mode="r").attrs
    assert attrs["zero_variance"]["test"] == 4


def test_large_random_case_error_bound(tmp_path):
    """A larger case (more runs, wider reduction) still within 1e-5 of float64."""
    test, train = random_source(tmp_path / "src", [150, 150], n_test=200, n_train=600,
                                classes=10, seed=7)
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    K = run(tmp_path / "store", tmp_path / "k", chunks=(64, 128), max_memory=2 << 20)
    ref = reference_kernel(test, train)
    err = np.abs(K - ref).max()
    assert err <= 1e-5, err
    assert top_sets(K) == top_sets(ref)


def test_finished_kernel_of_other_inputs_needs_overwrite(small_store, tmp_path):
    store, test, train = small_store
    run(store, tmp_path / "k", runs=10)
    with pytest.raises(KernelOutputError, match="--overwrite"):
        run(store, tmp_path / "k", runs=12)
    K = run(store, tmp_path / "k", runs=12, overwrite=True)
    assert np.abs(K - reference_kernel(test[:12], train[:12])).max() <= 1e-5


@pytest.mark.fault
def test_partial_kernel_of_changed_store_needs_restart(small_store, tmp_path):
    store, test, train = small_store
    run(store, tmp_path / "k", chunks=(16, 32), rows=(0, 16))
    # the store changes: one more file
    rng = np.random.default_rng(9)
    write_log(tmp_path / "src" / "logs_saveoutputs_main" / "zzz" / "log.pt",
              rng.normal(size=(3, 40, 5)), rng.normal(size=(3, 96, 5)))
    ingest_dir(tmp_path / "src", store, show_progress=False)
    with pytest.raises(CheckpointMismatchError, match="--restart"):
        run(store, tmp_path / "k", chunks=(16, 32))
    run(store, tmp_path / "k", chunks=(16, 32), restart=True)


def test_bf16_is_not_offered(small_store, tmp_path):
    store, *_ = small_store
    with pytest.raises(ConfigError, match="bf16"):
        run(store, tmp_path / "k", precision="bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("tf32", 2e-4)])
def test_cuda_against_float64(tmp_path, precision, tol):
    test, train = random_source(tmp_path / "src", [200, 300], n_test=300, n_train=1000,
                                classes=10, seed=2)
    ingest_dir(tmp_path / "src", tmp_path / "store", show_progress=False)
    K = run(tmp_path / "store", tmp_path / "k", device="cuda", precision=precision)
    ref = reference_kernel(test, train)
    assert np.abs(K - ref).max() <= tol


def test_out_of_memory_retries_once_with_smaller_tiles(small_store, tmp_path, monkeypatch,
                                                       capsys):
    import torch

    import kernelscale.kernel as kmod

    store, test, train = small_store
    real = kmod.run_plan
    budgets = []

    def flaky(p, *a, **kw):
        budgets.append(p.budget)
        if len(budgets) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(p, *a, **kw)

    monkeypatch.setattr(kmod, "run_plan", flaky)
    K = run(store, tmp_path / "k", max_memory=1 << 20)
    assert budgets == [1 << 20, 1 << 19]
    assert "out of memory" in capsys.readouterr().err
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


def test_out_of_memory_twice_is_a_clear_error(small_store, tmp_path, monkeypatch):
    import torch

    import kernelscale.kernel as kmod
    from kernelscale.errors import KernelscaleError

    def always(*a, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(kmod, "run_plan", always)
    with pytest.raises(KernelscaleError, match="out of memory on cpu even with a budget"):
        run(store := small_store[0], tmp_path / "k", max_memory=1 << 20)
    assert store.exists()


def _published_kernel(te, tr):
    """The published code's own computation (float32 throughout), on the CPU."""
    import torch

    def normalize(logits):
        logits = torch.from_numpy(logits).float().log_softmax(-1)
        return (logits - logits.mean(0, keepdim=True)) / logits.std(0, keepdim=True)

    a, b = normalize(te), normalize(tr)
    C = a.shape[-1]
    k = torch.zeros(a.shape[1], b.shape[1])
    for c in range(C):
        k += (a[..., c].T @ b[..., c]) / len(a) / C
    return k.numpy()


def test_log_softmax_fp32_reproduces_the_published_method(tmp_path):
    """Confident logits: the default follows float64, the fp32 mode the published code."""
    from kernelscale.simulation import simulate

    simulate(tmp_path / "sim", runs=60, files=2, n_train=600, n_test=150, seed=1,
             progress=False)
    ingest_dir(tmp_path / "sim", tmp_path / "store", show_progress=False)
    import glob

    import torch
    objs = [torch.load(f, weights_only=True)
            for f in sorted(glob.glob(str(tmp_path / "sim" / "**" / "log.pt"), recursive=True))]
    te = torch.cat([o["logits"] for o in objs]).numpy()
    tr = torch.cat([o["logits_train"] for o in objs]).numpy()
    exact, published = reference_kernel(te, tr), _published_kernel(te, tr)
    assert np.abs(published - exact).max() > 1e-3  # the data does saturate float32
    K = run(tmp_path / "store", tmp_path / "k64")
    assert np.abs(K - exact).max() <= 1e-5
    K32 = run(tmp_path / "store", tmp_path / "k32", log_softmax_fp32=True)
    assert np.abs(K32 - published).max() <= 1e-5
    ident = zarr.open_group(str(tmp_path / "k32"), mode="r").attrs["identity"]
    assert ident["log_softmax_fp32"] is True


@pytest.mark.fault
def test_overwrite_never_removes_a_directory_that_is_not_a_kernel(small_store, tmp_path):
    store, *_ = small_store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(KernelOutputError, match="is not a kernelscale kernel"):
        run(store, mine, overwrite=True)
    for target in (store, store / "inside", store.parent):
        with pytest.raises(KernelOutputError, match="is the store"):
            run(store, target, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (store / "manifest.json").is_file() and not (store / "inside").exists()
    # a kernel folder: --overwrite removes the kernel, never a file a user keeps there
    k = tmp_path / "k"
    run(store, k)
    (k / "notes.txt").write_text("mine too")
    run(store, k, runs=11, overwrite=True)
    assert (k / "notes.txt").read_text() == "mine too"
    assert zarr.open_group(str(k), mode="r").attrs["runs"] == 11
    # a symbolic link is not followed into a removal
    link = tmp_path / "link"
    link.symlink_to(k)
    with pytest.raises(KernelOutputError, match="symbolic link"):
        run(store, link, runs=12, overwrite=True)
    assert zarr.open_group(str(k), mode="r").attrs["runs"] == 11


def test_a_kernel_of_another_store_names_it(small_store, tmp_path):
    store, *_ = small_store
    other = tmp_path / "other"
    ingest_dir(tmp_path / "src", other, max_files=2, show_progress=False)
    run(other, tmp_path / "k")
    with pytest.raises(KernelOutputError, match=f"computed from the store {other}, not {store}"):
        run(store, tmp_path / "k")


def test_out_of_memory_retry_runs_after_the_failed_pass_is_freed(small_store, tmp_path,
                                                                 monkeypatch):
    """The retry must not run inside the ``except`` block, where the traceback still
    holds the failed pass's tensors (so emptying the cache would free nothing)."""
    import gc
    import weakref

    import torch

    import kernelscale.kernel as kmod

    store, test, train = small_store
    real = kmod.run_plan
    held = []
    alive_at_collect = []

    def flaky(p, ctx):
        if not held:
            big = torch.empty(1 << 16)  # a tensor of the failed pass
            held.append(weakref.ref(big))
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                               "`cublasCreate(handle)`")
        return real(p, ctx)

    real_collect = gc.collect

    def collect(*a):
        alive_at_collect.append(held[0]() is not None)
        return real_collect(*a)

    monkeypatch.setattr(kmod, "run_plan", flaky)
    monkeypatch.setattr(kmod.gc, "collect", collect)
    K = run(store, tmp_path / "k", max_memory=1 << 20)
    assert alive_at_collect == [False]  # collected once, after the traceback let go
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


def test_other_runtime_errors_are_not_retried(small_store, tmp_path, monkeypatch):
    import kernelscale.kernel as kmod

    calls = []

    def broken(p, ctx):
        calls.append(p.budget)
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(kmod, "run_plan", broken)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        run(small_store[0], tmp_path / "k")
    assert len(calls) == 1


def test_padded_operands_and_poisoned_buffers_give_the_same_kernel(small_store, tmp_path,
                                                                   monkeypatch):
    """Operands padded with zero columns (as on CUDA), a short last run-chunk, and
    buffers poisoned with NaN as soon as they are released: the same kernel."""
    import kernelscale.kernel_plan as pmod
    import kernelscale.reader as rmod

    store, test, train = small_store
    plain = run(store, tmp_path / "plain", runs_per_step=5)
    monkeypatch.setattr(pmod, "operand_padding", lambda device: 32)
    monkeypatch.setattr(rmod, "POISON_RELEASED", True)
    padded = run(store, tmp_path / "padded", runs_per_step=5)  # 24 runs: last chunk of 4
    assert np.isfinite(padded).all()
    assert np.abs(padded - plain).max() <= 1e-6
    assert np.abs(padded - reference_kernel(test, train)).max() <= 1e-5


def test_engine_plan_counts_padding_and_fixed_temporaries(small_store, tmp_path):
    from kernelscale.kernel import KernelConfig
    from kernelscale.kernel_plan import engine_plan
    from kernelscale.plan import pass_bytes

    cfg = KernelConfig(store=small_store[0], out=tmp_path / "k", runs_per_step=3)
    p = engine_plan(cfg, budget=1 << 30)
    assert p.runs_per_step == 3 and p.pad == 1 and p.reserve == 0  # the CPU's
    tiles = [p.tiles[i] for i in p.passes[0]]
    assert p.pass_bytes(0) == pass_bytes(tiles, 3, 5, 2, 1)
    # padding 15 columns to 32 costs (rows + cols) * 17 * 4 more bytes
    rows = max(t.r1 for t in tiles) - min(t.r0 for t in tiles)
    cols = max(t.c1 for t in tiles) - min(t.c0 for t in tiles)
    assert pass_bytes(tiles, 3, 5, 2, 32) - pass_bytes(tiles, 3, 5, 2, 1) == (rows + cols) * 68


def test_cpu_plan_takes_the_long_reduction_unless_the_short_one_saves_passes(tmp_path):
    from types import SimpleNamespace

    import torch

    from kernelscale.kernel import KernelConfig
    from kernelscale.kernel_plan import plan_kernel
    from kernelscale.plan import Tile, pass_bytes

    # 2000 runs of 10 classes, store chunks of 10 runs: 410 runs per step for 4096,
    # 60 for 512
    shape = SimpleNamespace(run_chunk=10, dtype="float16", classes=10)
    res = SimpleNamespace(shape=(1000, 5000), n_classes=10, store=SimpleNamespace(shape=shape),
                          runs=2000, region=Tile(0, 1000, 0, 5000))
    cfg = KernelConfig(store=tmp_path / "s", out=tmp_path / "k")
    cpu = torch.device("cpu")
    whole = [Tile(0, 1000, 0, 5000)]
    chunks = (100, 500)
    roomy = plan_kernel(cfg, res, cpu, 1 << 34, chunks)
    assert (roomy.runs_per_step, len(roomy.passes)) == (410, 1)
    # room for the whole output with 60-run steps, not with 410 (which would need smaller
    # tiles in several passes): the short reduction saves passes
    tight = pass_bytes(whole, 60, 10) + 1
    assert pass_bytes(whole, 410, 10) > tight
    p = plan_kernel(cfg, res, cpu, tight, chunks)
    assert (p.runs_per_step, len(p.passes)) == (60, 1)
    # a GPU keeps its long reduction
    assert plan_kernel(cfg, res, torch.device("cuda"), 1 << 34, chunks).runs_per_step == 410


@pytest.mark.fault
def test_a_second_writer_or_a_restart_is_refused_naming_the_holder(small_store, tmp_path):
    """While one process computes a region, a second writer of that region and a
    --restart/--overwrite of the kernel are refused with one line; another region of
    the same kernel (a Slurm array's task) may still be computed."""
    import multiprocessing as mp

    from kernelscale.locks import writer_lock
    from kernelscale.plan import Tile

    store, *_ = small_store
    out = tmp_path / "k"
    create_output(KernelConfig(store=store, out=out, chunks=(16, 32), show_progress=False))
    ready, stop = mp.Event(), mp.Event()

    def hold() -> None:
        with writer_lock(out, Tile(0, 40, 0, 96)):
            ready.set()
            stop.wait(30)

    proc = mp.get_context("fork").Process(target=hold)
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(KernelOutputError, match=r"are being computed by pid \d+ on "):
            run(store, out, chunks=(16, 32))
        with pytest.raises(KernelOutputError, match="being computed by pid"):
            run(store, out, runs=11, chunks=(16, 32), restart=True)
        # a disjoint region is another task's work
        run(store, out, chunks=(16, 32), rows=(16, 32), cols=(0, 96))
    finally:
        stop.set()
        proc.join(10)
    K = run(store, out, chunks=(16, 32))
    assert K.shape == (40, 96)


@pytest.mark.fault
def test_a_replace_killed_half_way_is_finished_by_the_next_run(small_store, tmp_path):
    """--overwrite killed after removing the old kernel and before the new one was
    complete leaves only kernelscale's own members: the next run builds the kernel."""
    from kernelscale.output import _remove_members

    store, test, train = small_store
    out = tmp_path / "k"
    run(store, out)
    (out / ".lock").touch()
    _remove_members(out)
    import zarr as z

    z.open_group(str(out), mode="a")  # a group without its attributes, as if killed
    K = run(store, out)
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5
    # a folder without our lock is never taken for such leftovers
    other = tmp_path / "other"
    z.open_group(str(other), mode="a")
    with pytest.raises(KernelOutputError, match="is not a kernelscale kernel"):
        run(store, other)
    assert (other / "zarr.json").is_file()


def test_add_product_sums_float32_products_into_float64_reusing_its_scratch():
    import torch

    g = torch.Generator().manual_seed(3)
    op_x = torch.randn(7, 40, generator=g)
    op_y = torch.randn(5, 40, generator=g)
    acc = torch.randn(7, 5, generator=g, dtype=torch.float64)
    want = acc.clone()
    scratch = None
    for k in (40, 23):  # a whole operand, then a shorter chunk's column view of it
        x, y = op_x[:, :k], op_y[:, :k]
        want += x.double() @ y.double().T
        scratch = accumulate.add_product(acc, x, y, scratch)
    assert scratch.dtype == np.float32 and scratch.size == 35
    np.testing.assert_allclose(acc.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    # a smaller tile reuses the scratch; a larger one gets a new one
    small = torch.zeros(2, 3, dtype=torch.float64)
    assert accumulate.add_product(small, op_x[:2], op_y[:3], scratch) is scratch
    np.testing.assert_allclose(small.numpy(), (op_x[:2].double() @ op_y[:3].double().T)
                               .numpy(), rtol=1e-5, atol=1e-5)
    big = torch.zeros(7, 6, dtype=torch.float64)
    grown = accumulate.add_product(big, op_x, torch.cat([op_y, op_y[:1]]), scratch)
    assert grown is not scratch and grown.size == 42
    # a tile times itself (a square kernel's diagonal in a pass of shared operands) has
    # the bits of the same values held in two buffers (numpy's own path for x @ x.T,
    # SYRK, rounds otherwise: 1e-5 apart at this size)
    same, apart = (torch.zeros(7, 7, dtype=torch.float64) for _ in range(2))
    accumulate.add_product(same, op_x, op_x)
    accumulate.add_product(apart, op_x, op_x.clone())
    assert torch.equal(same, apart)
