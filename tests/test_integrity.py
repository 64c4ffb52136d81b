"""Corruption is detected, never computed on: checksummed chunks, missing files, verify
and its repairs, each with the fault injected."""

import shutil

import numpy as np
import pytest
import zarr

from kernelscale.errors import KernelOutputError, StoreError
from kernelscale.integrity import verify
from kernelscale.kernel import KernelConfig, compute_kernel
from kernelscale.rawchunks import CRC_BYTES, ChunkDamaged, chunk_path, raw_layout
from kernelscale.store import Store
from tests.conftest import run_cli
from tests.reference import labels_file, reference_kernel

pytestmark = pytest.mark.fault


def _flip(path, offset=10):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x40
    path.write_bytes(bytes(b))


def _kernel(store, out):
    compute_kernel(KernelConfig(store=store, out=out, show_progress=False))
    return zarr.open_group(str(out), mode="r")["kernel"][...]


def test_new_stores_and_kernels_carry_checksums(small_store, tmp_path):
    store, *_ = small_store
    s = Store.open(store)
    assert s.checksummed("test") and s.checksummed("train")
    _kernel(store, tmp_path / "k")
    k = zarr.open_group(str(tmp_path / "k"), mode="r")["kernel"]
    assert raw_layout(k).checksum
    rep = verify(store)
    assert not rep.problems and rep.checked == 2 * 6 + 4  # 24 runs in chunks of 4, 4 stats
    assert not verify(tmp_path / "k").problems


@pytest.mark.parametrize("fault", ["flip", "missing", "short"])
def test_damaged_store_chunk_is_refused_named_and_repaired(small_source, small_store,
                                                          tmp_path, fault):
    src, test, train = small_source
    store, *_ = small_store
    want = _kernel(store, tmp_path / "k0")
    chunk = chunk_path(store / "logits" / "train", (3, 0, 0))  # runs 12:16, files 2 and 3
    if fault == "flip":
        _flip(chunk)
    elif fault == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:-CRC_BYTES - 8])
    with pytest.raises(ChunkDamaged) as ei:
        _kernel(store, tmp_path / "k1")
    msg = str(ei.value)
    assert str(chunk) in msg and "\n" not in msg
    assert ("runs 12:16 of train come from logs_saveoutputs_main/file001/log.pt, "
            "logs_saveoutputs_main/file002/log.pt" in msg)
    r = run_cli("verify", str(store), check=False)
    assert r.returncode == 1 and str(chunk) in r.stdout and "1 problem(s)" in r.stdout
    # the repair rewrites the chunk from the source files, checked by sha256
    r = run_cli("verify", str(store), "--repair", str(src), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout.splitlines()[-1]
    np.testing.assert_array_equal(_kernel(store, tmp_path / "k2"), want)


def test_repair_refuses_a_source_that_is_not_the_ingested_one(small_store, tmp_path):
    store, *_ = small_store
    _flip(chunk_path(store / "logits" / "test", (0, 0, 0)))
    other = tmp_path / "other"
    from tests.reference import random_source

    random_source(other, [7, 8, 9], seed=99)
    r = run_cli("verify", str(store), "--repair", str(other), check=False)
    assert r.returncode != 0 and "not the file ingested as" in r.stderr
    assert verify(store).problems  # nothing was changed


def test_damaged_statistics_are_refused_and_recomputed(small_source, small_store, tmp_path):
    src, test, train = small_source
    store, *_ = small_store
    gen = Store.open(store).manifest["stats_generation"]
    stat = store / "stats" / f"g{gen}" / "train_mean" / "c" / "0" / "0"
    _flip(stat)
    r = run_cli("info", str(store), check=False)
    assert r.returncode != 0 and "unreadable" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(StoreError, match="unreadable"):
        _kernel(store, tmp_path / "k")
    r = run_cli("verify", str(store), "--repair", str(src), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    K = _kernel(store, tmp_path / "k2")
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


def test_damaged_kernel_chunk_is_refused_and_only_its_tile_recomputed(small_store, tmp_path):
    store, test, train = small_store
    out = tmp_path / "k"
    compute_kernel(KernelConfig(store=store, out=out, chunks=(16, 32), tile=(16, 32),
                                show_progress=False))
    want = zarr.open_group(str(out), mode="r")["kernel"][...]
    labels = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    ok = run_cli("evaluate", "--store", str(store), "--kernel", str(out), "--labels",
                 str(labels))
    chunk = chunk_path(out / "kernel", (1, 2))
    _flip(chunk)
    r = run_cli("evaluate", "--store", str(store), "--kernel", str(out), "--labels",
                str(labels), check=False)
    assert r.returncode != 0 and "checksum mismatch" in r.stderr and str(chunk) in r.stderr
    assert "\n" not in r.stderr.strip()
    r = run_cli("verify", str(out), "--repair", check=False)
    assert r.returncode == 0 and "1 tile(s)" in r.stdout
    done_before = len(list((out / ".done").glob("*.json")))
    s = compute_kernel(KernelConfig(store=store, out=out, chunks=(16, 32), tile=(16, 32),
                                    show_progress=False))
    assert s.tiles_skipped == done_before  # only the damaged tile was recomputed
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["kernel"][...], want)
    again = run_cli("evaluate", "--store", str(store), "--kernel", str(out), "--labels",
                    str(labels))
    assert again.stdout == ok.stdout


def test_missing_kernel_chunk_is_not_read_as_zeros(small_store, tmp_path):
    store, *_ = small_store
    out = tmp_path / "k"
    _kernel(store, out)
    chunk_path(out / "kernel", (0, 0)).unlink()
    labels = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    r = run_cli("evaluate", "--store", str(store), "--kernel", str(out), "--labels",
                str(labels), check=False)
    assert r.returncode != 0 and "chunk file missing" in r.stderr
    with pytest.raises(KernelOutputError, match="missing"):
        from kernelscale.kernelread import load_kernel

        load_kernel(out)


def test_store_without_checksums_still_reads_and_verifies_sizes(small_source, tmp_path):
    """A store written before checksums (plain chunk files) keeps working."""
    src, test, train = small_source
    store = tmp_path / "plain"
    from tests.conftest import ingest_dir

    ingest_dir(src, store, run_chunk=4, show_progress=False)
    # rewrite both logits arrays as plain bytes, as older stores hold them
    for split in ("test", "train"):
        arr = zarr.open_array(str(store / "logits" / split), mode="r")
        data, chunks = arr[...], arr.chunks
        shutil.rmtree(store / "logits" / split)
        g = zarr.open_group(str(store / "logits"), mode="a")
        new = g.create_array(split, shape=data.shape, chunks=chunks, dtype=data.dtype,
                             compressors=None, fill_value=0,
                             dimension_names=("run", split, "class"))
        new[...] = data
    assert not Store.open(store).checksummed("train")
    K = _kernel(store, tmp_path / "k")
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5
    rep = verify(store)
    assert not rep.problems and not rep.checksummed
    chunk_path(store / "logits" / "train", (1, 0, 0)).unlink()
    assert [p.problem for p in verify(store).problems] == ["chunk file missing"]


def test_a_missing_statistics_array_is_recomputed(small_source, small_store, tmp_path):
    src, test, train = small_source
    store, *_ = small_store
    gen = Store.open(store).manifest["stats_generation"]
    shutil.rmtree(store / "stats" / f"g{gen}" / "train_m2")
    r = run_cli("verify", str(store), "--repair", str(src), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    K = _kernel(store, tmp_path / "k")
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5
