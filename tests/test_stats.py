import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale import fused, stats
from kernelscale.stats import (
    FLOAT64,
    LOG1P32,
    LOGITS,
    PUBLISHED32,
    NonFiniteValues,
    RunningStats,
    stats_of_logits,
    transform64,
)
from tests.reference import confident_logits, log_softmax_exact64


@pytest.fixture(autouse=True, params=["fused", "torch form"])
def cpu_form(request, monkeypatch):
    """Every test on both CPU forms: the one-pass kernels and the torch form (the form
    every other device runs)."""
    monkeypatch.setenv(fused.ENV, "1" if request.param == "fused" else "0")
    return request.param


@settings(max_examples=60, deadline=None)
@given(runs=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_merge_of_any_split_equals_all_at_once(runs, cuts, seed):
    x = np.random.default_rng(seed).normal(size=(runs, 7, 3)) * 3
    bounds = sorted({c for c in cuts if c < runs} | {0, runs})
    acc = RunningStats.empty(7, 3)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        acc = acc.merge(stats_of_logits(x[a:b], LOGITS))
    assert acc.count == runs
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(acc.std(), x.std(0, ddof=1), rtol=1e-10)


def test_constant_entries_have_exactly_zero_m2_and_zero_inverse_std():
    x = np.random.default_rng(0).normal(size=(9, 4, 3))
    x[:, 1, 2] = 0.1  # not exactly representable: rounding must not make m2 > 0
    acc = RunningStats.empty(4, 3)
    for a, b in ((0, 2), (2, 5), (5, 9)):
        acc = acc.merge(stats_of_logits(x[a:b], LOGITS))
    assert acc.m2[1, 2] == 0.0
    assert acc.inv_std()[1, 2] == 0.0
    assert acc.zero_variance() == 1


def _values(logits: np.ndarray, transform: str = LOG1P32) -> np.ndarray:
    return transform64(torch.from_numpy(logits), transform).numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(got - want) / np.maximum(np.abs(want), 1e-300)).max())


@pytest.mark.parametrize("transform", [LOG1P32, FLOAT64])
def test_stats_of_logits_is_log_softmax_statistics(transform):
    logits = (np.random.default_rng(1).normal(size=(37, 11, 5)) * 4).astype(np.float16)
    s = stats_of_logits(logits, transform)
    x = log_softmax_exact64(logits)
    assert s.count == 37
    assert _rel(s.mean, x.mean(0)) <= 1e-6
    assert _rel(s.std(), x.std(0, ddof=1)) <= 1e-6


@pytest.mark.parametrize("margin", [(15.0, 25.0), (60.0, 120.0)])
def test_log1p32_keeps_confident_top_classes_to_1e_6(margin):
    """The float32 form's mean and std stay within 1e-6 relative of the exact float64
    evaluation on confident logits (margins past ~87 nats: the float64 fallback rows),
    where the published float32 log_softmax is orders of magnitude off."""
    logits = confident_logits(300, 40, 10, 3, margin)
    want = log_softmax_exact64(logits)
    s = stats_of_logits(logits, LOG1P32)
    assert _rel(s.mean, want.mean(0)) <= 1e-6
    assert _rel(s.std(), want.std(0, ddof=1)) <= 1e-6
    naive = stats_of_logits(logits, PUBLISHED32)
    assert _rel(naive.std(), want.std(0, ddof=1)) > 1e-3


def test_log1p32_values_match_exact_float64_and_handle_ties():
    logits = confident_logits(20, 30, 10, 4)
    logits[0, 0, :2] = 7.0  # a tie at the top: both classes get log(1/2) + ...
    logits[0, 0, 2:] = -20.0
    got = _values(logits, LOG1P32)
    want = log_softmax_exact64(logits)
    assert _rel(got, want) <= 2e-6
    assert abs(got[0, 0, 0] - np.log(0.5)) < 1e-6


def test_stats_are_the_same_for_any_block_size(monkeypatch):
    logits = (np.random.default_rng(2).normal(size=(50, 13, 4)) * 3).astype(np.float16)
    whole = stats_of_logits(logits)
    monkeypatch.setitem(stats.STATS_BLOCK_BYTES, "cpu", 3 * 13 * 4 * 4)  # 3-run blocks
    blocks = stats_of_logits(logits)
    np.testing.assert_allclose(blocks.mean, whole.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(blocks.m2, whole.m2, rtol=1e-10, atol=1e-15)


def test_stats_of_identical_runs_have_exactly_zero_m2():
    one = (np.random.default_rng(3).normal(size=(1, 6, 5)) * 5).astype(np.float16)
    s = stats_of_logits(np.repeat(one, 9, axis=0))
    assert (s.m2 == 0).all() and s.zero_variance() == 30
    # the mean is exactly the one run's values, as the same computation gives them
    np.testing.assert_array_equal(s.mean, stats_of_logits(one).mean)
    np.testing.assert_allclose(s.mean, _values(one)[0], rtol=1e-6)


def test_non_finite_values_are_found_from_the_sums():
    logits = np.zeros((5, 4, 3), dtype=np.float32)
    logits[3, 2, 1] = np.nan
    with pytest.raises(NonFiniteValues):
        stats_of_logits(logits)
    logits[3, 2, 1] = -np.inf
    with pytest.raises(NonFiniteValues):
        stats_of_logits(logits)


def test_numpy_and_torch_inputs_give_the_same_bits():
    import torch

    logits = (np.random.default_rng(4).normal(size=(30, 9, 6)) * 3).astype(np.float16)
    a = stats_of_logits(logits)
    b = stats_of_logits(torch.from_numpy(logits))
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.m2, b.m2)


def test_the_statistics_of_a_numpy_array_load_no_torch_on_the_cpu():
    """An ingest on the CPU never loads torch (~1.5 s of a process): the one-pass kernels
    take numpy arrays, and their thread count falls back to OMP_NUM_THREADS."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from kernelscale import fused\n"
            "from kernelscale.stats import stats_of_logits\n"
            "x = np.random.default_rng(0).normal(size=(3, 50, 10)).astype(np.float16)\n"
            "s = stats_of_logits(x)\n"
            "print('torch' in sys.modules, fused._threads(), s.count)\n")
    env = {**os.environ, fused.ENV: "1", "OMP_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "3", "3"]
