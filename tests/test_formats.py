"""Input formats besides log.pt: safetensors, .npz, .npy pairs and Zarr groups.

Each is written from the same simulated logits as the log.pt files of the reference
ingest, and must give a store whose logits and statistics are bitwise those of the log.pt
ingest (and whose logits are the simulated ones, read back with torch on their own). A
bad file of each kind is refused with one line naming it, and nothing of it is stored.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import kernelscale.formats.zarr_io as zarr_io
from kernelscale.config import load_job
from kernelscale.errors import BadInputError, ConfigError
from kernelscale.formats import sniff
from kernelscale.simulation import simulate
from kernelscale.sources.ranged import RangedFile
from kernelscale.store import Store
from tests.conftest import ingest_dir, run_cli
from tests.hubserver import HubServer
from tests.reference import mutate, write_log
from tests.test_hub import hf_env  # noqa: F401 -- autouse: a private HF home per test
from tests.test_hub import ingest as hub_ingest

SIM = {"runs": 12, "files": 3, "n_train": 60, "n_test": 30, "classes": 10, "seed": 1}
KEYS = ("logits", "logits_train")
MARKER = Path("/tmp/kernelscale-pwned")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """(root, units, ref): the simulated log.pt files' logits in sorted path order as
    (folder relative to the source, test, train), and the store their ingest made."""
    root = tmp_path_factory.mktemp("sim")
    simulate(root / "logpt", progress=False, **SIM)
    units = []
    for f in sorted((root / "logpt").rglob("log.pt")):
        obj = torch.load(f, weights_only=True)
        units.append((f.parent.relative_to(root / "logpt"), obj["logits"].numpy(),
                      obj["logits_train"].numpy()))
    ingest_dir(root / "logpt", root / "ref", show_progress=False)
    return root, units, root / "ref"


def assert_same_as_ref(store: Path, ref: Path, units) -> None:
    """Logits and statistics bitwise those of ``ref``, files of the same run ranges, and
    the logits those of ``units`` (read without kernelscale)."""
    a, b = Store.open(store), Store.open(ref)
    assert a.runs == b.runs == sum(u[1].shape[0] for u in units)
    assert ([(f["run_start"], f["run_stop"]) for f in a.manifest["files"]]
            == [(f["run_start"], f["run_stop"]) for f in b.manifest["files"]])
    assert a.shape == b.shape
    for i, split in ((1, "test"), (2, "train")):
        np.testing.assert_array_equal(a.read(split, 0, a.runs),
                                      np.concatenate([u[i] for u in units]))
        np.testing.assert_array_equal(a.read(split, 0, a.runs), b.read(split, 0, b.runs))
        assert a.stats(split).mean.tobytes() == b.stats(split).mean.tobytes()
        assert a.stats(split).m2.tobytes() == b.stats(split).m2.tobytes()


# ------------------------------------------------------------------------- writers

def w_safetensors(d: Path, te, tr, keys=KEYS, name="chunk.safetensors") -> None:
    save_file({keys[0]: np.ascontiguousarray(te), keys[1]: np.ascontiguousarray(tr)}, d / name)


def w_npz(d: Path, te, tr, keys=KEYS, name="chunk.npz") -> None:
    with open(d / name, "wb") as fh:
        np.savez(fh, **{keys[0]: te, keys[1]: tr})


def w_npz_compressed(d: Path, te, tr, keys=KEYS, name="chunk.npz") -> None:
    with open(d / name, "wb") as fh:
        np.savez_compressed(fh, **{keys[0]: te, keys[1]: tr})


def w_npy(d: Path, te, tr, keys=KEYS, name="chunk") -> None:
    np.save(d / f"{name}.{keys[0]}.npy", te)
    np.save(d / f"{name}.{keys[1]}.npy", tr)


def w_npy_folder(d: Path, te, tr, keys=KEYS, name="") -> None:
    """One folder per chunk: logits.npy + logits_train.npy (an unzipped .npz)."""
    np.save(d / f"{keys[0]}.npy", te)
    np.save(d / f"{keys[1]}.npy", tr)


WRITERS = {"safetensors": (w_safetensors, "**/*.safetensors", "safetensors", "safetensors"),
           "npz": (w_npz, "**/*.npz", "npy", "npz"),
           "npz-compressed": (w_npz_compressed, "**/*.npz", "npy", "npz"),
           "npy": (w_npy, "**/*.npy", "npy", "npy"),
           "npy-folder": (w_npy_folder, "**/*.npy", "npy", "npy")}


def write_units(root: Path, units, writer, **kw) -> Path:
    for rel, te, tr in units:
        (root / rel).mkdir(parents=True, exist_ok=True)
        writer(root / rel, te, tr, **kw)
    return root


def write_group(path: Path, test, train, keys=KEYS, run_chunk=4, zarr_format=3,
                dtype=None) -> Path:
    g = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    for key, a in zip(keys, (test, train), strict=True):
        a = a.astype(dtype) if dtype else a
        kw = {"compressors": [zarr.codecs.Crc32cCodec()]} if zarr_format == 3 else {}
        g.create_array(key, shape=a.shape, dtype=a.dtype, chunks=(run_chunk, *a.shape[1:]),
                       **kw)[...] = a
    return path


# ------------------------------------------------------------------- same store

@pytest.mark.parametrize("fmt", ["auto", "explicit"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_format_ingests_bitwise_like_logpt(sim, tmp_path, kind, fmt):
    root, units, ref = sim
    writer, glob, explicit, recorded = WRITERS[kind]
    src = write_units(tmp_path / "src", units, writer)
    s = ingest_dir(src, tmp_path / "store", glob=glob, show_progress=False,
                   format=fmt if fmt == "auto" else explicit)
    assert s.files_ingested == len(units)
    assert_same_as_ref(tmp_path / "store", ref, units)
    files = Store.open(tmp_path / "store").manifest["files"]
    assert {f["format"] for f in files} == {recorded}
    if kind.startswith("npy"):  # a pair: both files' names, sizes and sha256
        import hashlib

        for f, (rel, *_) in zip(files, units, strict=True):
            names = [p["name"] for p in f["parts"]]
            prefix = f"{rel.as_posix()}/" + ("chunk." if kind == "npy" else "")
            assert names == [f"{prefix}logits.npy", f"{prefix}logits_train.npy"]
            assert f["name"] == f"{prefix}{{logits,logits_train}}.npy"
            data = [(src / n).read_bytes() for n in names]
            assert [p["sha256"] for p in f["parts"]] == [hashlib.sha256(d).hexdigest()
                                                         for d in data]
            assert f["sha256"] == hashlib.sha256(b"".join(data)).hexdigest()
            assert f["size"] == sum(map(len, data))
    # a second run finds everything ingested
    again = ingest_dir(src, tmp_path / "store", glob=glob, show_progress=False)
    assert (again.files_ingested, again.files_skipped) == (0, len(units))


@pytest.mark.parametrize("zarr_format,dtype", [(3, None), (2, ">f2")])
def test_zarr_blocks_ingest_bitwise_like_logpt(sim, tmp_path, monkeypatch, zarr_format,
                                               dtype):
    """Blocks of one run-chunk (4 runs, as the log.pt files hold); a v2 group of
    big-endian float16 reads as the same values."""
    root, units, ref = sim
    monkeypatch.setattr(zarr_io, "BLOCK_BYTES", 1)
    g = write_group(tmp_path / "ens.zarr", np.concatenate([u[1] for u in units]),
                    np.concatenate([u[2] for u in units]), zarr_format=zarr_format,
                    dtype=dtype)
    s = ingest_dir(g, tmp_path / "store", show_progress=False)
    assert s.files_ingested == 3
    assert_same_as_ref(tmp_path / "store", ref, units)
    m = Store.open(tmp_path / "store").manifest
    assert [f["name"] for f in m["files"]] == ["ens.zarr[runs 0:4]", "ens.zarr[runs 4:8]",
                                               "ens.zarr[runs 8:12]"]
    assert [f["source_runs"] for f in m["files"]] == [[0, 4], [4, 8], [8, 12]]
    assert m["sources"][0]["kind"] == "zarr"
    import hashlib

    blk = [np.ascontiguousarray(a[0:4]).astype("<f2").tobytes()
           for a in (units[0][1], units[0][2])]
    assert m["files"][0]["sha256"] == hashlib.sha256(b"".join(blk)).hexdigest()


def test_zarr_group_from_the_command_line_with_keys(sim, tmp_path):
    """`--keys` naming nested arrays; one block (the default size) equals one log.pt
    file of all the runs."""
    root, units, _ = sim
    te, tr = (np.concatenate([u[i] for u in units]) for i in (1, 2))
    g = write_group(tmp_path / "g.zarr", te, tr, keys=("out/test", "out/train"))
    write_log(tmp_path / "one" / "all" / "log.pt", te, tr)
    ingest_dir(tmp_path / "one", tmp_path / "ref1", show_progress=False)
    p = run_cli("ingest", str(g), "--store", str(tmp_path / "s"), check=False)
    assert p.returncode == 2 and "missing key(s) 'logits', 'logits_train'" in p.stderr
    assert not (tmp_path / "s").exists()
    run_cli("ingest", str(g), "--store", str(tmp_path / "s"), "--keys", "out/test,out/train")
    assert_same_as_ref(tmp_path / "s", tmp_path / "ref1", [(None, te, tr)])
    # grown by 4 runs: the one block is now runs 0:16, which overlaps the ingested 0:12
    grp = zarr.open_group(g, mode="a")
    for key, a in (("out/test", te), ("out/train", tr)):
        grp[key].append(a[:4])
    p = run_cli("ingest", str(g), "--store", str(tmp_path / "s"), "--keys",
                "out/test,out/train", check=False)
    assert p.returncode == 2 and "overlaps the ingested g.zarr[runs 0:12]" in p.stderr


@pytest.mark.parametrize("kind", ["safetensors", "npz", "npy"])
def test_keys_map_other_names(sim, tmp_path, kind):
    root, units, ref = sim
    writer, glob, *_ = WRITERS[kind]
    src = write_units(tmp_path / "src", units, writer, keys=("test_out", "train_out"))
    p = run_cli("ingest", str(src), "--store", str(tmp_path / "s"), "--glob", glob,
                check=False)
    assert p.returncode != 0 and "test_out" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s").exists()
    run_cli("ingest", str(src), "--store", str(tmp_path / "s"), "--glob", glob,
            "--keys", "test_out,train_out")
    assert_same_as_ref(tmp_path / "s", ref, units)


# ---------------------------------------------------------------- auto by content

def test_auto_decides_by_content_not_name(sim, tmp_path):
    """Every file is named log.pt: a torch file, a safetensors file and an .npz."""
    root, units, ref = sim
    src = tmp_path / "src"
    kinds = ["logpt", "safetensors", "npz"]
    for (rel, te, tr), kind in zip(units, kinds, strict=True):
        (src / rel).mkdir(parents=True)
        if kind == "logpt":
            write_log(src / rel / "log.pt", te, tr)
        else:
            {"safetensors": w_safetensors, "npz": w_npz}[kind](src / rel, te, tr,
                                                               name="log.pt")
    run_cli("ingest", str(src), "--store", str(tmp_path / "s"))
    assert_same_as_ref(tmp_path / "s", ref, units)
    assert [f["format"] for f in Store.open(tmp_path / "s").manifest["files"]] == kinds
    p = run_cli("ingest", str(src), "--store", str(tmp_path / "t"), "--format", "logpt",
                check=False)
    assert p.returncode == 2 and "not a torch file" in p.stderr
    p = run_cli("ingest", str(src), "--store", str(tmp_path / "t2"), "--format",
                "safetensors", check=False)
    assert p.returncode == 2 and "not a safetensors file (it is a torch.save file" in p.stderr


def test_sniff_tells_each_kind_apart(tmp_path):
    te = np.zeros((2, 3, 4), np.float16)
    cases = {"a.pt": "logpt", "b.safetensors": "safetensors", "c.npz": "npz",
             "d.npy": "npy", "e.txt": None}
    torch.save({"logits": torch.zeros(2)}, tmp_path / "a.pt")
    save_file({"logits": te}, tmp_path / "b.safetensors")
    np.savez(tmp_path / "c.npz", logits=te)
    np.save(tmp_path / "d.npy", te)
    (tmp_path / "e.txt").write_text("hello, world\n")
    # a header of 128 bytes: the length's first byte is 0x80, a pickle's first byte
    head = json.dumps({"t": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "f.safetensors").write_bytes(struct.pack("<Q", 128) + head.ljust(128)
                                             + b"\0\0")
    cases["f.safetensors"] = "safetensors"
    for name, want in cases.items():
        assert sniff(tmp_path / name, name) == want, name
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes((tmp_path / name).read_bytes()[:40])  # truncated: same verdict
        assert sniff(cut, name) == want, f"truncated {name}"


# --------------------------------------------------------------------- bad files

class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _good(rng, runs=3, n_test=40, n_train=96, c=5, dtype=np.float16):
    return (rng.normal(size=(runs, n_test, c)).astype(dtype),
            rng.normal(size=(runs, n_train, c)).astype(dtype))


def _cut(p: Path, frac: float = 0.6) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:int(len(data) * frac)])


def _npy_bytes(a: np.ndarray, shape=None) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(a.dtype),
                                               "fortran_order": False,
                                               "shape": shape or a.shape})
    return buf.getvalue() + a.tobytes()


def _raw_safetensors(p: Path, entries: dict, data: bytes, n: int | None = None) -> None:
    head = json.dumps(entries).encode()
    head += b" " * (-len(head) % 8)
    p.write_bytes(struct.pack("<Q", len(head) if n is None else n) + head + data)


def _bad_cases():
    """name -> (glob, maker(dir), message). Makers write into ``dir/u`` (a Zarr group:
    ``dir/g.zarr``); glob None: the source is the group."""
    rng = np.random.default_rng(0)
    te, tr = _good(rng)
    st, npz = "**/*.safetensors", "**/*.npz"
    npy = "**/*.npy"

    def st_save(**t):
        return lambda d: save_file(t, d / "chunk.safetensors")

    def st_then(fn):
        def make(d):
            save_file({"logits": te, "logits_train": tr}, d / "chunk.safetensors")
            fn(d / "chunk.safetensors")
        return make

    def st_bf16(d):
        from safetensors.torch import save_file as save_torch

        save_torch({"logits": torch.from_numpy(te).bfloat16(),
                    "logits_train": torch.from_numpy(tr).bfloat16()}, d / "chunk.safetensors")

    def st_lying_shape(d):
        _raw_safetensors(d / "chunk.safetensors", {
            "logits": {"dtype": "F16", "shape": [30, 40, 5], "data_offsets": [0, te.nbytes]},
            "logits_train": {"dtype": "F16", "shape": list(tr.shape),
                             "data_offsets": [te.nbytes, te.nbytes + tr.nbytes]}},
            te.tobytes() + tr.tobytes())

    def st_lying_length(d):
        _raw_safetensors(d / "chunk.safetensors", {}, te.tobytes(), n=10_000_000)

    def st_overlap(d):
        _raw_safetensors(d / "chunk.safetensors", {
            "logits": {"dtype": "F16", "shape": list(te.shape), "data_offsets": [0, te.nbytes]},
            "logits_train": {"dtype": "F16", "shape": list(te.shape),
                             "data_offsets": [0, te.nbytes]}}, te.tobytes())

    def npz_save(compressed=False, **a):
        def make(d):
            (np.savez_compressed if compressed else np.savez)(d / "chunk.npz", **a)
        return make

    def npz_then(fn):
        def make(d):
            np.savez(d / "chunk.npz", logits=te, logits_train=tr)
            fn(d / "chunk.npz")
        return make

    def npz_lying(d):
        with zipfile.ZipFile(d / "chunk.npz", "w") as z:
            z.writestr("logits.npy", _npy_bytes(te, shape=(30, 40, 5)))
            z.writestr("logits_train.npy", _npy_bytes(tr))

    def npy_pair(test=None, train=None, test_bytes=None):
        def make(d):
            if test_bytes is not None:
                (d / "chunk.logits.npy").write_bytes(test_bytes)
            else:
                np.save(d / "chunk.logits.npy", te if test is None else test,
                        allow_pickle=True)
            if train is not False:
                np.save(d / "chunk.logits_train.npy", tr if train is None else train)
        return make

    def npy_then(fn):
        def make(d):
            npy_pair()(d)
            fn(d / "chunk.logits.npy")
        return make

    def group(test=te, train=tr, keys=KEYS, after=None):
        def make(d):
            if keys == KEYS[:1]:
                g = zarr.open_group(d / "g.zarr", mode="w")
                g.create_array("logits", data=test, chunks=(1, 40, 5))
            else:
                write_group(d / "g.zarr", test, train, keys=keys, run_chunk=1)
            if after:
                after(d / "g.zarr")
        return make

    def flip(p: Path) -> None:
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))

    nan = te.copy()
    nan[1, 2, 3] = np.nan
    obj = np.array([Evil(), 1], dtype=object)
    return {
        "st truncated": (st, st_then(_cut), "truncated"),
        "st not 3-D": (st, st_save(logits=te[0], logits_train=tr),
                       "has shape (40, 5), expected (runs, examples, classes)"),
        "st wrong examples": (st, st_save(logits=_good(rng, n_test=41)[0], logits_train=tr),
                              "41 test examples, but the store holds 40"),
        "st float64": (st, st_save(logits=te.astype(np.float64),
                                   logits_train=tr.astype(np.float64)), "dtype float64"),
        "st bfloat16": (st, st_bf16, "has dtype bfloat16, expected one of float16, float32"),
        "st float32 into float16 store": (
            st, st_save(logits=te.astype(np.float32), logits_train=tr.astype(np.float32)),
            "dtype float32, but the store holds float16"),
        "st shape lies about size": (st, st_lying_shape, "but its data_offsets span"),
        "st length lies about size": (st, st_lying_length, "truncated safetensors file"),
        "st overlapping tensors": (st, st_overlap, "overlapping tensors"),
        "st trailing bytes": (st, st_then(lambda p: p.write_bytes(p.read_bytes() + b"x" * 8)),
                              "8 trailing bytes"),
        "st missing key": (st, st_save(logits=te), "missing key(s) 'logits_train'"),
        "st non-finite": (st, st_save(logits=nan, logits_train=tr), "non-finite"),
        "npz truncated": (npz, npz_then(_cut), "not a readable .npz"),
        "npz object": (npz, npz_save(logits=obj, logits_train=tr), "holds Python objects"),
        "npz missing key": (npz, npz_save(logits=te), "missing key(s) 'logits_train'"),
        "npz float64": (npz, npz_save(logits=te.astype(np.float64), logits_train=tr),
                        "dtype float64"),
        "npz header lies about size": (npz, npz_lying, "the header declares (30, 40, 5)"),
        "npz compressed bomb": (npz, npz_save(True, logits=np.zeros((3, 400_000, 5),
                                                                    np.float16),
                                              logits_train=tr), "more than logits compress"),
        "npy pickle": (npy, npy_pair(test=obj), "holds Python objects"),
        "npy truncated": (npy, npy_then(_cut), "(truncated)"),
        "npy padded": (npy, npy_then(lambda p: p.write_bytes(p.read_bytes() + b"\0" * 6)),
                       "6 bytes too many"),
        "npy header lies about size": (npy, npy_pair(test_bytes=_npy_bytes(te, (30, 40, 5))),
                                       "(truncated)"),
        "npy without its pair": (npy, npy_pair(train=False),
                                 "no chunk.logits_train.npy beside it"),
        "npy float64": (npy, npy_pair(test=te.astype(np.float64)), "dtype float64"),
        "npy runs mismatch": (npy, npy_pair(train=_good(rng, runs=4)[1]),
                              "3 runs but 'logits_train' has 4"),
        "npy not numpy": (npy, npy_pair(test_bytes=b"just text\n"), "not a NumPy .npy file"),
        "unrecognised content": (st, lambda d: (d / "x.safetensors").write_bytes(
            rng.bytes(1500)), "not a torch file, safetensors or NumPy"),
        "zarr missing key": (None, group(keys=KEYS[:1]), "missing key(s) 'logits_train'"),
        "zarr float64": (None, group(test=te.astype(np.float64), train=tr.astype(np.float64)),
                         "dtype float64"),
        "zarr wrong classes": (None, group(*_good(rng, c=6)),
                               "6 classes, but the store holds 5"),
        "zarr missing chunk": (None, group(after=lambda g: (g / "logits_train/c/1/0/0")
                                           .unlink()), "is missing"),
        "zarr corrupt chunk": (None, group(after=lambda g: flip(g / "logits/c/2/0/0")),
                               "cannot read 'logits'"),
        "zarr non-finite": (None, group(test=nan), "non-finite"),
    }


@pytest.mark.fault
def test_mutated_files_are_refused_or_read_as_the_reference_readers_read_them(tmp_path):
    """Random byte flips, cuts and insertions: every outcome is a BadInputError or the
    arrays numpy's or safetensors' own reader gives for the same bytes."""
    from safetensors.numpy import load_file as st_reference

    from kernelscale.formats import load_file
    from kernelscale.formats.numpy_io import load_npy_pair

    rng = np.random.default_rng(3)
    te, tr = _good(rng, n_test=8, n_train=12)
    save_file({"logits": te, "logits_train": tr}, tmp_path / "g.safetensors")
    np.savez(tmp_path / "g.npz", logits=te, logits_train=tr)
    np.savez_compressed(tmp_path / "c.npz", logits=te, logits_train=tr)
    np.save(tmp_path / "t.npy", te)
    np.save(tmp_path / "r.npy", tr)

    def reference(p: Path, name: str):
        if name.endswith(".safetensors"):
            d = st_reference(p)
            return d["logits"], d["logits_train"]
        if name.endswith(".npz"):
            with np.load(p, allow_pickle=False) as z:
                return z["logits"], z["logits_train"]
        return np.load(p, allow_pickle=False), tr

    outcomes = {"read": 0, "refused": 0}
    for name in ("g.safetensors", "g.npz", "c.npz", "t.npy"):
        good = (tmp_path / name).read_bytes()
        for _ in range(150):
            _, b = mutate(good, rng, insert_below=200)
            p = tmp_path / f"m-{name}"
            p.write_bytes(b)
            try:
                if name.endswith(".npy"):
                    got = load_npy_pair((p, tmp_path / "r.npy"), ("a", "b"), "pair", KEYS)
                else:
                    got = load_file(p, name)[1:]
            except BadInputError:
                outcomes["refused"] += 1
                continue
            outcomes["read"] += 1
            try:
                want = reference(p, name)
            except Exception:  # noqa: BLE001 -- a stored member's CRC is not checked
                assert name == "g.npz"
                continue
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
    assert outcomes["read"] > 20 and outcomes["refused"] > 300, outcomes


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    write_log(d / "src" / "a" / "log.pt", *_good(np.random.default_rng(9)))
    ingest_dir(d / "src", d / "store", show_progress=False)
    return d / "store"


def _snapshot(path: Path):
    s = Store.open(path)
    return s.manifest, s.read("test", 0, s.runs).tobytes(), s.stats("test").m2.tobytes()


@pytest.mark.fault
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_file_gives_one_line_and_stores_nothing(good_store, tmp_path, case):
    glob, maker, message = _bad_cases()[case]
    src = tmp_path / "src"
    (src / "u").mkdir(parents=True)
    MARKER.unlink(missing_ok=True)
    maker(src / "u")
    source = src / "u" / "g.zarr" if glob is None else src
    named = "g.zarr" if glob is None else "u/"
    # into a store that exists: one line, the store as it was
    store = tmp_path / "store"
    import shutil

    shutil.copytree(good_store, store)
    before = _snapshot(store)
    p = run_cli("ingest", str(source), "--store", str(store),
                *(("--glob", glob) if glob else ()), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("kernelscale: error:") and named in lines[0], lines[0]
    assert message in lines[0], lines[0]
    assert _snapshot(store) == before
    if "the store holds" in message:
        return  # a file bad only for that store
    # as the first file: no store at all
    with pytest.raises(BadInputError, match=named):
        ingest_dir(source, tmp_path / "new", glob=glob or "**/log.pt", show_progress=False)
    assert not (tmp_path / "new").exists() or not Store.exists(tmp_path / "new")
    assert not MARKER.exists(), "a pickle was executed"


def test_skip_bad_records_a_bad_pair_and_goes_on(sim, tmp_path):
    root, units, ref = sim
    src = write_units(tmp_path / "src", units, w_npy)
    bad = src / "zz"
    bad.mkdir()
    np.save(bad / "chunk.logits.npy", units[0][1])  # no partner
    p = run_cli("ingest", str(src), "--store", str(tmp_path / "s"), "--glob", "**/*.npy",
                "--skip-bad", check=False)
    assert p.returncode == 1 and "zz/chunk.logits.npy: no chunk.logits_train.npy" in p.stderr
    assert_same_as_ref(tmp_path / "s", ref, units)
    m = Store.open(tmp_path / "s").manifest
    assert [r["name"] for r in m["rejected"]] == ["zz/chunk.logits.npy"]


# ------------------------------------------------------------------ Hub and config

def test_hub_ingests_safetensors_npz_and_npy_pairs(sim, tmp_path):
    """One chunk of each format in a Hub repo (served by the local test server), read
    with --format auto: the store of the log.pt files."""
    root, units, ref = sim
    src = tmp_path / "repo"
    for (rel, te, tr), w in zip(units, (w_safetensors, w_npz, w_npy), strict=True):
        (src / rel).mkdir(parents=True)
        w(src / rel, te, tr)
    (src / "README.md").write_text("logits\n")
    with HubServer(page_size=2) as hub:
        commit = hub.add_commit("local/sim", src)
        s = hub_ingest(hub, tmp_path / "store", tmp_path, glob="**/chunk*")
    assert s.files_ingested == 3
    assert_same_as_ref(tmp_path / "store", ref, units)
    files = Store.open(tmp_path / "store").manifest["files"]
    assert [f["format"] for f in files] == ["safetensors", "npz", "npy"]
    assert all(f["commit"] == commit for f in files)
    assert [p["name"] for p in files[2]["parts"]] == [
        f"{units[2][0].as_posix()}/chunk.logits.npy",
        f"{units[2][0].as_posix()}/chunk.logits_train.npy"]
    assert not list((tmp_path / "cache").rglob("*.npy")), "downloads kept"


def test_job_file_format_and_keys(tmp_path):
    job = tmp_path / "job.toml"

    def load(table: str):
        job.write_text(f'[job]\nname = "j"\n[ingest]\nsource = "src"\n{table}\n')
        return load_job(job)

    cfg = load('format = "npy"\nkeys = "a,b"')
    assert (cfg.ingest.format, cfg.ingest.keys) == ("npy", ("a", "b"))
    ic = cfg.ingest_config()
    assert (ic.format, ic.keys) == ("npy", ("a", "b"))
    assert load('keys = ["x", "y"]').ingest.keys == ("x", "y")
    assert load("").ingest_config().keys == KEYS
    for bad, msg in (('format = "hdf5"', "format 'hdf5': expected one of auto, logpt"),
                     ('keys = "a"', "keys 'a': expected two names TEST,TRAIN"),
                     ('keys = "a,a"', "must differ")):
        with pytest.raises(ConfigError, match=msg):
            load(bad)
    with pytest.raises(ConfigError, match="reads a local Zarr group"):
        ingest_dir("hf://datasets/a/b", tmp_path / "s", format="zarr")


def test_paired_source_hands_back_nothing_it_yielded(tmp_path):
    """A wrapped source that takes back what it fetched when closed early (as the Hub's
    deletes its downloads) is run to its end, not closed, once every file is yielded: the
    last file is still the consumer's to release."""
    from kernelscale.sources.base import Fetched, Source, SourceFile
    from kernelscale.sources.pairs import PairedSource

    taken_back = []

    class Inner(Source):
        kind = "test"

        def list(self, glob):
            return [SourceFile(n, 1, path=tmp_path / n) for n in
                    ("a.logits.npy", "a.logits_train.npy", "b.safetensors")]

        def fetch(self, files):
            handed = []
            try:
                for f in files:
                    handed.append(Fetched(f, f.path))
                    yield handed[-1]
            except GeneratorExit:
                taken_back.extend(h.file.name for h in handed if not h.released)
                raise

    src = PairedSource(Inner(), KEYS)
    units = src.list("*")
    assert [u.name for u in units] == ["a.{logits,logits_train}.npy", "b.safetensors"]
    got = list(src.fetch(units))
    assert [g.file.name for g in got] == [u.name for u in units] and taken_back == []
    gen = src.fetch(units)
    next(gen)
    gen.close()  # the consumer stopped early: the inner source takes its files back
    assert taken_back == ["a.logits.npy", "a.logits_train.npy"]


# ------------------------------------------------------------- headers by ranges

@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_of_arbitrary_bytes_is_the_loaders_verdict(tmp_path, data):
    """Valid files of each format, mutated (bytes flipped, cut, inserted): the header
    read through ranges raises nothing but BadInputError, and whenever the loader reads
    the file the header declares the shapes and dtype the loader returned (but for
    log.pt, which torch reads more leniently: a damaged zip member's CRC, say)."""
    from kernelscale.errors import BadInputError
    from kernelscale.formats import load_file
    from kernelscale.formats.headers import read_header

    good = _small_files()
    name = data.draw(st.sampled_from(sorted(good)))
    b = bytearray(good[name])
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del b[at:]
        else:
            b[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    raw = bytes(b)
    fh = RangedFile(len(raw), lambda a, z: raw[a:z], tail=256, block=64, name=name)
    try:
        h = read_header(fh, len(raw), name)
    except BadInputError:
        h = None
    if name.endswith(".pt"):
        return
    p = tmp_path / name
    p.write_bytes(raw)
    try:
        _, te, tr = load_file(p, name)
    except BadInputError:
        return
    assert h is not None
    assert (h.test.shape, h.train.shape, h.test.dtype) == (te.shape, tr.shape, str(te.dtype))


@functools.cache
def _small_files() -> dict[str, bytes]:
    """A tiny file of each format holding both splits, logits and logits_train."""
    from safetensors.numpy import save

    rng = np.random.default_rng(2)
    te = rng.normal(size=(2, 3, 4)).astype(np.float16)
    tr = rng.normal(size=(2, 5, 4)).astype(np.float16)
    out = {"a.safetensors": save({"logits": te, "logits_train": tr})}
    for name, fn in (("b.npz", np.savez), ("c.npz", np.savez_compressed)):
        buf = io.BytesIO()
        fn(buf, logits=te, logits_train=tr)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"logits": torch.from_numpy(te), "logits_train": torch.from_numpy(tr),
                "code": "x"}, buf)
    out["d.pt"] = buf.getvalue()
    return out


@settings(max_examples=200, deadline=None)
@given(doc=st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["zarr_format", "node_type", "shape", "data_type",
                                     "dtype"]),
                    st.one_of(st.integers(-2, 4), st.text(max_size=6),
                              st.sampled_from(["array", "float16", "<f4", "|f3", "b8"]),
                              st.lists(st.integers(-1, 9), max_size=4))).map(
        lambda d: json.dumps(d).encode())))
def test_zarr_metadata_of_arbitrary_bytes_is_a_shape_or_one_error(doc):
    """A Zarr array's metadata document, whatever its bytes: a shape of sizes and a
    dtype name, or BadInputError -- and for what zarr itself writes, zarr's shape."""
    from kernelscale.formats.zarr_io import array_metadata

    try:
        meta = array_metadata(doc, "m")
    except BadInputError:
        return
    assert all(isinstance(d, int) and d >= 0 for d in meta.shape)
    assert isinstance(meta.dtype, str)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_metadata_is_zarrs_own_shape(tmp_path, zarr_format):
    from kernelscale.formats.zarr_io import array_metadata, metadata_names

    a = np.zeros((5, 7, 3), np.float32)
    write_group(tmp_path / "g", a, a[:, :4], run_chunk=2, zarr_format=zarr_format)
    name = metadata_names("logits_train")[0 if zarr_format == 3 else 1]
    meta = array_metadata((tmp_path / "g" / name).read_bytes(), name)
    assert (meta.shape, meta.dtype) == ((5, 4, 3), "float32")
