"""The one-pass CPU kernels against the torch form and an exact float64 evaluation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from kernelscale import fused, fused_kernels
from kernelscale.normalise import Normaliser
from kernelscale.stats import LOG1P32, PUBLISHED32, NonFiniteValues, stats_of_logits
from tests.reference import confident_logits, log_softmax_exact64

CPU = torch.device("cpu")


@njit
def _widen(h, out):
    for i in range(h.size):
        out[i] = fused_kernels.half(h[i])


@njit
def _widen_by_tables(h, out):
    for i in range(h.size):
        out[i] = fused_kernels.half_table(h[i])


@njit
def _exp_log1p(d, s, e_out, l_out):
    """exp of ``d`` and log1p of ``s`` (float32 arrays), as the kernels compute them;
    log1p's halving count as the kernels' tile loop finds it, for up to 1000 classes."""
    for i in range(d.size):
        e_out[i] = fused_kernels.exp_neg(d[i])
        k = np.float32(0.0)
        b = fused_kernels._SQRT2
        while b <= 1000:
            k += np.float32(1.0) if np.float32(1.0) + s[i] >= b else np.float32(0.0)
            b = b * np.float32(2.0)
        l_out[i] = fused_kernels.log1p_k(s[i], k)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(got - want) / np.maximum(np.abs(want), 1e-300)).max())


@pytest.fixture(autouse=True)
def kernels_for_every_size(monkeypatch):
    """The kernels for calls of any size (the tests' arrays are below MIN_VALUES)."""
    monkeypatch.setenv(fused.ENV, "1")


@pytest.fixture
def torch_form(monkeypatch):
    """Run the block under the torch form (the reference on every device)."""
    def use(on: bool) -> None:
        monkeypatch.setenv(fused.ENV, "0" if on else "1")
    return use


def test_the_kernels_are_what_the_cpu_runs(monkeypatch):
    # numba is a dependency: a missing one must fail here, not fall back unnoticed
    assert fused.enabled()
    # by default from MIN_VALUES on; "1" for every call; "0" never
    monkeypatch.delenv(fused.ENV)
    assert fused.use(fused.MIN_VALUES) and not fused.use(fused.MIN_VALUES - 1)
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.use(1)
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.use(fused.MIN_VALUES) and not fused.enabled()


def _values(logits: np.ndarray) -> np.ndarray:
    """LOG1P32 values (R, n, C) float64 of the kernels' row computation."""
    x = np.ascontiguousarray(logits)
    if x.dtype == np.float16:
        x = x.view(np.uint16)
    runs, n, c = x.shape
    scratch = fused_kernels.scratch(c)
    out = np.empty((runs, n, c))
    for r in range(runs):
        for e0 in range(0, n, fused_kernels.TILE):
            m = min(fused_kernels.TILE, n - e0)
            fused_kernels.tile(x, r, e0, m, *scratch)
            out[r, e0:e0 + m] = scratch[-1][:, :m].T
    return out


def _z(logits: np.ndarray, classes=None) -> np.ndarray:
    """The standardised values (R, n, C') with mean 0 and scale 1, read back from a
    padded float32 operand."""
    x = torch.from_numpy(logits)
    k, n, c = x.shape
    cls = np.arange(c) if classes is None else np.asarray(classes)
    out = np.full((n, k * len(cls) + 3), 7.0, np.float32)
    fused.standardise(x, cls.astype(np.int64), np.zeros((len(cls), n)),
                      np.ones((len(cls), n)), out)
    assert (out[:, k * len(cls):] == 7.0).all()  # the padding is left alone
    return out[:, :k * len(cls)].reshape(n, k, len(cls)).transpose(1, 0, 2).astype(np.float64)


@pytest.mark.parametrize("margin", [(0.0, 5.0), (15.0, 25.0), (60.0, 120.0)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_values_match_exact_float64(margin, dtype):
    """Every class, the top one of a confident prediction included (margins past ~87
    nats take the float64 rows), to float32's relative precision."""
    logits = confident_logits(7, 300, 10, 5, margin).astype(dtype)
    assert _rel(_values(logits), log_softmax_exact64(logits)) <= 2e-6


def test_values_handle_ties_many_classes_and_class_subsets():
    logits = confident_logits(4, 50, 1000, 6, (3.0, 9.0))  # others-sums up to ~999
    logits[0, 0, :] = -3.0
    logits[0, 0, 5] = logits[0, 0, 9] = 4.0  # a tie at the top
    want = log_softmax_exact64(logits)
    assert _rel(_values(logits), want) <= 2e-6
    assert abs(_values(logits)[0, 0, 5] - want[0, 0, 5]) < 1e-6
    # the standardisation's class subset, in its order (float32: 6e-8 more)
    assert _rel(_z(logits, [9, 2, 5]), want[..., [9, 2, 5]]) <= 2e-6
    assert _rel(_z(logits), want) <= 2e-6


@pytest.mark.parametrize("margin", [(0.0, 5.0), (15.0, 25.0), (60.0, 120.0)])
def test_statistics_are_within_1e_6_of_float64_where_float32_log_softmax_fails(margin):
    logits = confident_logits(300, 40, 10, 3, margin)
    want = log_softmax_exact64(logits)
    s = stats_of_logits(logits, LOG1P32)
    assert _rel(s.mean, want.mean(0)) <= 1e-6
    assert _rel(s.std(), want.std(0, ddof=1)) <= 1e-6
    if margin[0] > 10:
        assert _rel(stats_of_logits(logits, PUBLISHED32).std(), want.std(0, ddof=1)) > 1e-3


def test_statistics_agree_with_the_torch_form(torch_form):
    logits = (np.random.default_rng(4).normal(size=(60, 333, 10)) * 5).astype(np.float16)
    ours = stats_of_logits(logits)
    torch_form(True)
    ref = stats_of_logits(logits)
    assert _rel(ours.mean, ref.mean) <= 1e-6
    assert _rel(ours.std(), ref.std()) <= 1e-6


def test_statistics_do_not_depend_on_blocks_or_threads(monkeypatch):
    logits = (np.random.default_rng(5).normal(size=(45, 301, 7)) * 3).astype(np.float16)
    whole = stats_of_logits(logits)
    monkeypatch.setattr(fused, "BLOCK_BYTES", 4 * 301 * 7 * 4)  # 4-run blocks
    monkeypatch.setattr(fused, "_threads", lambda: 3)
    split = stats_of_logits(logits)
    # the same operations in the same order for every entry: bit for bit
    np.testing.assert_array_equal(split.mean, whole.mean)
    np.testing.assert_array_equal(split.m2, whole.m2)


def test_identical_runs_have_exactly_zero_m2():
    one = (np.random.default_rng(3).normal(size=(1, 200, 5)) * 5).astype(np.float16)
    s = stats_of_logits(np.repeat(one, 9, axis=0))
    assert (s.m2 == 0).all() and s.zero_variance() == 1000


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("where", [(3, 150, 0), (0, 7, 4), (4, 299, 2)])
def test_a_non_finite_logit_gives_non_finite_statistics(bad, dtype, where):
    logits = (np.random.default_rng(6).normal(size=(5, 300, 5)) * 3).astype(dtype)
    logits[where] = bad
    with pytest.raises(NonFiniteValues):
        stats_of_logits(logits)


def test_standardisation_agrees_with_the_torch_form(torch_form):
    rng = np.random.default_rng(7)
    logits = torch.from_numpy((rng.normal(size=(40, 257, 10)) * 4).astype(np.float16))
    st_ = stats_of_logits(logits)
    for classes in (None, [0, 3, 9]):
        ours = Normaliser(st_, (0, 257), classes, CPU, LOG1P32)(logits[:11]).clone()
        torch_form(True)
        ref = Normaliser(st_, (0, 257), classes, CPU, LOG1P32)(logits[:11]).clone()
        torch_form(False)
        # z-scores are O(1): a few float32 ulps of the values, scaled by 1/std
        assert float((ours - ref).abs().max()) <= 1e-5
        assert ours.shape == ref.shape


def test_standardisation_of_an_example_range_uses_its_statistics():
    rng = np.random.default_rng(8)
    logits = torch.from_numpy((rng.normal(size=(12, 90, 4)) * 2).astype(np.float32))
    st_ = stats_of_logits(logits)
    z = Normaliser(st_, (30, 60), None, CPU, LOG1P32)(logits[:5, 30:60]).numpy()
    v = log_softmax_exact64(logits.numpy())[:5, 30:60]
    want = (v - st_.mean[30:60]) / st_.std()[30:60]
    np.testing.assert_allclose(z.reshape(30, 5, 4), want.transpose(1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("widen", [_widen, _widen_by_tables], ids=["used", "tables"])
def test_every_float16_is_widened_exactly(widen):
    """The form the kernels use (F16C's instruction where the CPU has it) and the
    tables (where it has not), over all 65536 bit patterns."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.empty(1 << 16, np.float32)
    widen(bits, got)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))
    assert not np.isfinite(got[~finite]).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_exp_and_log1p_are_within_a_few_float32_ulps(seed):
    rng = np.random.default_rng(seed)
    d = np.concatenate([[0.0, -87.0], -rng.uniform(0, 87, 2000),
                        -10 ** rng.uniform(-8, 0, 500)]).astype(np.float32)
    s = np.concatenate([[0.0], 10 ** rng.uniform(-30, 0, 2000),
                        rng.uniform(0, 999, 500)]).astype(np.float32)
    e, lg = np.empty_like(d), np.empty_like(s)
    _exp_log1p(d, s, e, lg)
    assert e[0] == 1.0 and lg[0] == 0.0  # exact where the top class needs it
    assert _rel(e, np.exp(d.astype(np.float64))) <= 3e-7
    assert _rel(lg[1:], np.log1p(s[1:].astype(np.float64))) <= 3e-7
    assert fused_kernels.exp_neg(np.float32(-88.0)) == 0.0
    assert fused_kernels.exp_neg(np.float32(np.nan)) == 0.0


def test_no_examples_give_empty_statistics_and_no_z_scores():
    s = stats_of_logits(np.zeros((4, 0, 3), np.float16))
    assert s.count == 4 and s.mean.shape == (0, 3) and s.m2.shape == (0, 3)
    out = np.zeros((0, 12), np.float32)
    fused.standardise(torch.zeros((4, 0, 3)), np.arange(3), np.zeros((3, 0)),
                      np.zeros((3, 0)), out)


def test_rows_whose_dropped_terms_could_matter_are_evaluated_in_float64():
    """exp below -87 is taken as 0: with 999 such terms beside one at -69 they are 1e-5
    of the others-sum, which the float64 evaluation of such rows keeps."""
    x = np.full((1, 1, 1000), -87.2, np.float32)
    x[0, 0, 0], x[0, 0, 1] = 0.0, -69.0
    assert _rel(_values(x), log_softmax_exact64(x)) <= 1e-6


def test_standardise_refuses_what_does_not_fit():
    x = torch.zeros((3, 10, 5))
    ok = (np.arange(5), np.zeros((5, 10)), np.ones((5, 10)), np.zeros((10, 15), np.float32))
    fused.standardise(x, *ok)
    for bad in ((np.arange(7), np.zeros((7, 10)), np.ones((7, 10)), ok[3]),  # 7 of 5
                (np.array([0, 5]), np.zeros((2, 10)), np.ones((2, 10)), ok[3]),
                (*ok[:3], np.zeros((9, 15), np.float32)),
                (*ok[:3], np.zeros((10, 14), np.float32)),
                (*ok[:3], np.zeros((10, 15))),
                (ok[0], np.zeros((5, 9)), *ok[2:])):
        with pytest.raises(ValueError, match="do not fit"):
            fused.standardise(x, *bad)


def test_statistics_are_c_ordered_and_the_normaliser_holds_them_once():
    logits = (np.random.default_rng(9).normal(size=(6, 100, 4)) * 2).astype(np.float16)
    s = stats_of_logits(logits)
    assert s.mean.flags.c_contiguous and s.m2.flags.c_contiguous
    n = Normaliser(s, (0, 100), None, CPU, LOG1P32)
    assert np.shares_memory(n.mean.numpy(), n._fused[1])
    assert np.shares_memory(n.inv.numpy(), n._fused[2])


def test_the_kernel_engine_standardises_with_the_kernels(small_store, tmp_path, monkeypatch):
    import zarr

    from kernelscale.kernel import KernelConfig, compute_kernel
    from tests.reference import reference_kernel

    calls = []
    real = fused.standardise

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fused, "standardise", spy)
    store, test, train = small_store
    compute_kernel(KernelConfig(store=store, out=tmp_path / "k", show_progress=False))
    kernel = zarr.open_group(str(tmp_path / "k"), mode="r")["kernel"][...]
    # run-chunks of both splits (test rows, train columns) went through the kernels
    assert {shape[1] for shape in calls} == {test.shape[1], train.shape[1]}
    assert np.abs(kernel - reference_kernel(test, train)).max() <= 1e-5


def test_the_normaliser_chooses_by_the_whole_split(monkeypatch):
    """Unset ENV: the kernels for a split of MIN_VALUES values (runs x examples x
    classes) or more, whatever the example range or the run-chunk of a call."""
    monkeypatch.delenv(fused.ENV)
    logits = (np.random.default_rng(9).normal(size=(6, 50, 4)) * 3).astype(np.float16)
    st_ = stats_of_logits(logits)  # 1,200 values
    monkeypatch.setattr(fused, "MIN_VALUES", 1200)
    assert Normaliser(st_, (10, 12), None, CPU, LOG1P32)._fused is not None
    monkeypatch.setattr(fused, "MIN_VALUES", 1201)
    assert Normaliser(st_, (0, 50), None, CPU, LOG1P32)._fused is None


def test_the_target_cpu_decides_the_instructions(monkeypatch):
    """Features count as numba's target has them: the host's, or those a portable cache
    lists; a named CPU without a list has none (LLVM would abort on them)."""
    import llvmlite.binding as llvm
    import numba

    from kernelscale.cpufeatures import numba_target_has

    host = llvm.get_host_cpu_features()
    assert numba_target_has("f16c") == bool(host.get("f16c"))
    assert numba_target_has("f16c") == fused_kernels.HAS_F16C
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    assert not numba_target_has("sse4.2") and not numba_target_has("f16c")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+sse4.2,-f16c")
    assert numba_target_has("sse4.2") and not numba_target_has("f16c")
