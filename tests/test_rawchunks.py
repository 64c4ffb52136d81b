"""Chunk files written and read directly are exactly what Zarr writes and reads."""

import filecmp

import numpy as np
import pytest
import zarr

from kernelscale.kernelread import CheckedArray
from kernelscale.output import KernelOutput
from kernelscale.rawchunks import raw_layout


@pytest.mark.parametrize("shape,chunks,width", [((100, 300), (32, 64), 128),
                                                ((64, 128), (32, 64), 128),
                                                ((10, 7), (16, 16), 16)])
@pytest.mark.parametrize("direct", [True, False])
def test_chunk_major_rows_written_equal_zarr_writes(tmp_path, monkeypatch, shape, chunks,
                                                    width, direct):
    """The final write's route: float64 blocks of a chunk row, made chunk-major (zero
    past the edges), stored chunk file by chunk file (or through Zarr, for an array of
    other codecs): the same files and values as Zarr's own write."""
    import torch

    import kernelscale.output as omod
    from kernelscale.accumulate import chunk_major

    if not direct:
        monkeypatch.setattr(omod, "raw_layout", lambda arr: None)
    data = np.random.default_rng(1).standard_normal(shape)
    ident = {"pairs": "test-train"}
    ours = KernelOutput.open_or_create(tmp_path / "ours", ident, shape, chunks,
                                       overwrite=False, restart=False)
    theirs = KernelOutput.open_or_create(tmp_path / "theirs", ident, shape, chunks,
                                         overwrite=False, restart=False)
    (cr, cc), acc = chunks, torch.from_numpy(data)
    for r in range(0, shape[0], cr):
        for c in range(0, shape[1], width):
            block = acc[r:r + cr, c:c + width]
            cm = chunk_major(block, cr, cc)
            assert cm.shape == (-(-block.shape[1] // cc), cr, cc) and cm.is_contiguous()
            ours.write_chunk_row(r // cr, c // cc, cm.numpy(), *block.shape)
    theirs.array[...] = data.astype(np.float32)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "ours"))["kernel"][...],
                                  data.astype(np.float32))
    for f in sorted(p.relative_to(tmp_path / "theirs")
                    for p in (tmp_path / "theirs" / "kernel" / "c").rglob("*") if p.is_file()):
        assert filecmp.cmp(tmp_path / "ours" / f, tmp_path / "theirs" / f, shallow=False), f


def test_blocks_off_the_grid_and_compressed_arrays_go_through_zarr(tmp_path):
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
    r = CheckedArray(out.path, out.array)
    for sel in (slice(0, 64), slice(64, 100), slice(96, 100), slice(10, 20), slice(None)):
        np.testing.assert_array_equal(r[sel], data[sel])


@pytest.mark.parametrize("examples", [(0, 96), (32, 64), (0, 1), (95, 96)])
@pytest.mark.parametrize("block", [1000, 4 << 20])
def test_store_reads_of_an_example_range_equal_zarr_reads(small_store, examples, block,
                                                          monkeypatch):
    """A kernel pass over a few columns reads only their bytes of each run; after the
    first (whole, verified, block by block) read of a chunk file, later reads take the
    strided path."""
    from kernelscale import rawchunks
    from kernelscale.store import Store

    monkeypatch.setattr(rawchunks, "STRIDED_BLOCK_BYTES", block)  # 1000: a run per block

    store = Store.open(small_store[0])
    a, b = examples
    for _ in range(2):  # first read verifies whole chunks, the second reads strided
        for s, e in ((0, store.runs), (3, 9)):
            out = np.empty((e - s, b - a, store.shape.classes), dtype=store.shape.dtype)
            for job in store.read_jobs("train", s, e, out, examples=examples):
                job()
            np.testing.assert_array_equal(out, store.array("train")[s:e, a:b])


@pytest.mark.fault
def test_a_chunk_changed_after_its_first_verified_read_is_verified_again(small_store):
    from kernelscale.rawchunks import ChunkDamaged
    from kernelscale.store import Store

    store = Store.open(small_store[0])
    out = np.empty((4, 32, store.shape.classes), dtype=store.shape.dtype)
    for job in store.read_jobs("train", 0, 4, out, examples=(32, 64)):
        job()
    chunk = small_store[0] / "logits" / "train" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ChunkDamaged, match="checksum"):
        for job in store.read_jobs("train", 0, 4, out, examples=(32, 64)):
            job()
