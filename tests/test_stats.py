import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.stats import RunningStats, stats_of_logits
from tests.reference import log_softmax64


@settings(max_examples=60, deadline=None)
@given(runs=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_merge_of_any_split_equals_all_at_once(runs, cuts, seed):
    x = np.random.default_rng(seed).normal(size=(runs, 7, 3)) * 3
    bounds = sorted({c for c in cuts if c < runs} | {0, runs})
    acc = RunningStats.empty(7, 3)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        acc = acc.merge(RunningStats.from_block(x[a:b]))
    assert acc.count == runs
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(acc.std(), x.std(0, ddof=1), rtol=1e-10)


def test_constant_entries_have_exactly_zero_m2_and_zero_inverse_std():
    x = np.random.default_rng(0).normal(size=(9, 4, 3))
    x[:, 1, 2] = 0.1  # not exactly representable: rounding must not make m2 > 0
    acc = RunningStats.empty(4, 3)
    for a, b in ((0, 2), (2, 5), (5, 9)):
        acc = acc.merge(RunningStats.from_block(x[a:b]))
    assert acc.m2[1, 2] == 0.0
    assert acc.inv_std()[1, 2] == 0.0
    assert acc.zero_variance() == 1


def test_stats_of_logits_is_log_softmax_statistics():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(37, 11, 5)) * 4).astype(np.float16)
    s = stats_of_logits(logits, block_runs=8)
    x = log_softmax64(logits)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.std(), x.std(0, ddof=1), rtol=1e-10, atol=1e-12)
