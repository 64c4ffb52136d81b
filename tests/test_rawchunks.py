"""Chunk files written and read directly are exactly what Zarr writes and reads."""

import filecmp

import numpy as np
import pytest
import zarr

from kernelscale.output import KernelOutput
from kernelscale.rawchunks import raw_layout


@pytest.mark.parametrize("shape,chunks", [((100, 300), (32, 64)), ((64, 128), (32, 64)),
                                          ((10, 7), (16, 16))])
def test_kernel_blocks_written_directly_equal_zarr_writes(tmp_path, shape, chunks):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(shape).astype(np.float32)
    ident = {"pairs": "test-train"}
    ours = KernelOutput.open_or_create(tmp_path / "ours", ident, shape, chunks,
                                       overwrite=False, restart=False)
    theirs = KernelOutput.open_or_create(tmp_path / "theirs", ident, shape, chunks,
                                         overwrite=False, restart=False)
    assert raw_layout(ours.array) is not None
    cr = chunks[0]
    for r in range(0, shape[0], cr):  # row blocks, as the engine writes them
        ours.write_block(r, min(r + cr, shape[0]), 0, shape[1], data[r:r + cr])
    theirs.array[...] = data
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "ours"))["kernel"][...], data)
    files = sorted(p.relative_to(tmp_path / "theirs")
                   for p in (tmp_path / "theirs" / "kernel" / "c").rglob("*") if p.is_file())
    assert files
    for f in files:  # edge chunks included: stored at full shape, zero padded
        assert filecmp.cmp(tmp_path / "ours" / f, tmp_path / "theirs" / f, shallow=False), f


def test_block_off_the_grid_or_compressed_goes_through_zarr(tmp_path):
    data = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    out = KernelOutput.open_or_create(tmp_path / "k", {"pairs": "test-train"}, (64, 128),
                                      (32, 64), overwrite=False, restart=False)
    out.write_block(0, 64, 0, 128, data)
    out.write_block(8, 40, 10, 70, data[8:40, 10:70] + 1)  # not on the chunk grid
    want = data.copy()
    want[8:40, 10:70] += 1
    np.testing.assert_array_equal(out.array[...], want)
    g = zarr.open_group(str(tmp_path / "z"), mode="w")
    compressed = g.create_array("a", shape=(4, 4), chunks=(2, 2), dtype="float32")
    assert raw_layout(compressed) is None  # the default codecs compress


def test_checked_row_blocks_equal_zarr_reads(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((100, 300)).astype(np.float32)
    out = KernelOutput.open_or_create(tmp_path / "k", {"pairs": "test-train"}, (100, 300),
                                      (32, 64), overwrite=False, restart=False)
    out.array[...] = data
    r = out.reader
    for sel in (slice(0, 64), slice(64, 100), slice(96, 100), slice(10, 20), slice(None)):
        np.testing.assert_array_equal(r[sel], data[sel])
