import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.errors import ConfigError
from kernelscale.plan import Tile, plan, tile_bytes


@st.composite
def problems(draw):
    rows, cols = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
    cr, cc = draw(st.integers(1, 700)), draw(st.integers(1, 700))
    classes = draw(st.integers(2, 12))
    runs = draw(st.integers(2, 5000))
    store_chunk = draw(st.integers(1, 300))
    one_chunk = tile_bytes(min(cr, rows), min(cc, cols), 1, classes)
    budget = draw(st.integers(one_chunk, max(one_chunk, rows * cols * 24 + 10**7)))
    return dict(shape=(rows, cols), chunks=(cr, cc), classes=classes, runs=runs,
                store_run_chunk=store_chunk, budget=budget)


def check_plan(p, region):
    cover = np.zeros(p.shape, dtype=np.int32)
    cr, cc = p.chunks
    for t in p.tiles:
        cover[t.r0:t.r1, t.c0:t.c1] += 1
        # edges on the chunk grid (or the array end): no two tiles share a chunk
        assert t.r0 % cr == 0 and (t.r1 % cr == 0 or t.r1 == p.shape[0])
        assert t.c0 % cc == 0 and (t.c1 % cc == 0 or t.c1 == p.shape[1])
        assert p.tile_bytes(t) <= p.budget
    inside = np.zeros(p.shape, dtype=bool)
    inside[region.r0:region.r1, region.c0:region.c1] = True
    assert (cover[inside] == 1).all(), "every cell of the region exactly once"
    assert (cover[~inside] == 0).all()
    flat = sorted(i for ps in p.passes for i in ps)
    assert flat == list(range(len(p.tiles)))
    for i in range(len(p.passes)):
        assert p.pass_bytes(i) <= p.budget
    assert p.runs_per_step >= 1


@settings(max_examples=200, deadline=None)
@given(problems())
def test_plan_covers_region_exactly_once_within_budget(prob):
    p = plan(**prob)
    check_plan(p, Tile(0, prob["shape"][0], 0, prob["shape"][1]))
    assert p.runs_per_step % prob["store_run_chunk"] == 0 or p.runs_per_step == prob["runs"] \
        or p.runs_per_step < prob["store_run_chunk"]


@settings(max_examples=150, deadline=None)
@given(problems(), st.data())
def test_plan_of_aligned_region(prob, data):
    rows, cols = prob["shape"]
    cr, cc = prob["chunks"]
    nrb, ncb = -(-rows // cr), -(-cols // cc)
    a = data.draw(st.integers(0, nrb - 1))
    b = data.draw(st.integers(a + 1, nrb))
    c = data.draw(st.integers(0, ncb - 1))
    d = data.draw(st.integers(c + 1, ncb))
    region = Tile(a * cr, min(b * cr, rows), c * cc, min(d * cc, cols))
    p = plan(**prob, region=region)
    check_plan(p, region)


def test_misaligned_region_is_refused():
    with pytest.raises(ConfigError, match="chunk grid"):
        plan((100, 100), classes=10, budget=10**9, chunks=(32, 32), store_run_chunk=8,
             runs=50, region=Tile(5, 64, 0, 100))


def test_budget_below_one_chunk_is_refused():
    with pytest.raises(ConfigError, match="memory budget"):
        plan((1000, 1000), classes=10, budget=1000, chunks=(100, 100), store_run_chunk=8,
             runs=50)


def test_tile_override_must_be_chunk_multiple():
    with pytest.raises(ConfigError, match="multiples"):
        plan((100, 100), classes=10, budget=10**9, chunks=(32, 32), store_run_chunk=8,
             runs=50, tile=(40, 32))


def test_ample_budget_gives_one_tile_one_pass():
    p = plan((10000, 50000), classes=10, budget=80 << 30, chunks=(1024, 4096),
             store_run_chunk=64, runs=20000)
    assert len(p.tiles) == 1 and len(p.passes) == 1


def test_small_budget_multiple_passes_but_fewer_than_tiles_when_tiles_forced_small():
    p = plan((1000, 1000), classes=10, budget=4 << 20, chunks=(100, 100), store_run_chunk=8,
             runs=100, tile=(100, 100))
    assert len(p.tiles) == 100
    assert 1 < len(p.passes) < 100
