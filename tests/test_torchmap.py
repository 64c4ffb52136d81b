"""``torch.save`` files mapped without torch: the arrays ``torch.load`` gives, or None
(the caller then takes ``torch.load``)."""

import io
import pickle

import numpy as np
import pytest
import torch

from kernelscale.errors import BadInputError
from kernelscale.formats.torchmap import map_tensors
from kernelscale.logfile import load_log
from tests.reference import mutate

KEYS = ("logits", "logits_train")


def _save(path, obj, **kw):
    torch.save(obj, path, **kw)
    return path


def _pair(dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 5, generator=g).to(dtype),
            torch.randn(3, 6, 5, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64,
                                   torch.int64])
def test_a_plain_file_maps_to_the_arrays_torch_loads(tmp_path, dtype):
    te, tr = _pair(dtype)
    p = _save(tmp_path / "log.pt", {"logits": te, "logits_train": tr, "code": "x" * 5000})
    got = map_tensors(p, KEYS)
    assert got is not None
    before = p.read_bytes()
    for g, want in zip(got, (te, tr), strict=True):
        assert g.dtype == want.numpy().dtype and g.flags.c_contiguous
        np.testing.assert_array_equal(g, want.numpy())
        g[...] = 0  # copy-on-write: the file keeps its bytes
    del got
    assert p.read_bytes() == before


def test_views_into_one_storage_map_their_own_values(tmp_path):
    base = torch.arange(2 * 3 * 4 + 2 * 5 * 4, dtype=torch.float32)
    te = base[: 24].view(2, 3, 4)
    tr = base[24:].view(2, 5, 4)  # a storage offset
    p = _save(tmp_path / "log.pt", {"logits": te, "logits_train": tr})
    got = map_tensors(p, KEYS)
    np.testing.assert_array_equal(got[0], te.numpy())
    np.testing.assert_array_equal(got[1], tr.numpy())


def _legacy(path):
    te, tr = _pair()
    return _save(path, {"logits": te, "logits_train": tr},
                 _use_new_zipfile_serialization=False)


def _permuted(path):
    te, tr = _pair()
    return _save(path, {"logits": te.permute(1, 0, 2).contiguous().permute(1, 0, 2),
                        "logits_train": tr})


def _bfloat16(path):
    return _save(path, dict(zip(KEYS, _pair(torch.bfloat16), strict=True)))


def _other_global(path):
    te, tr = _pair()
    return _save(path, {"logits": te, "logits_train": tr, "size": torch.Size([1, 2])})


def _not_a_tensor(path):
    te, _ = _pair()
    return _save(path, {"logits": te, "logits_train": [1, 2]})


def _missing(path):
    te, _ = _pair()
    return _save(path, {"logits": te})


def _cut(path):
    te, tr = _pair()
    b = io.BytesIO()
    torch.save({"logits": te, "logits_train": tr}, b)
    path.write_bytes(b.getvalue()[:-100])
    return path


def _pickle(path):
    path.write_bytes(pickle.dumps({"logits": 1}))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [_legacy, _permuted, _bfloat16, _other_global,
                                  _not_a_tensor, _missing, _cut, _pickle])
def test_files_not_mapped_go_to_torch_with_its_verdict(tmp_path, make):
    p = make(tmp_path / "log.pt")
    assert map_tensors(p, KEYS) is None
    try:
        want = torch.load(p, weights_only=True)
    except Exception:  # noqa: BLE001 -- torch refuses it: so does load_log
        with pytest.raises(BadInputError, match="log.pt"):
            load_log(p)
        return
    if isinstance(want, dict) and all(isinstance(want.get(k), torch.Tensor) for k in KEYS) \
            and want[KEYS[0]].dtype in (torch.float16, torch.float32):
        log = load_log(p)
        np.testing.assert_array_equal(log.test, want[KEYS[0]].numpy())
        np.testing.assert_array_equal(log.train, want[KEYS[1]].numpy())
    else:
        with pytest.raises(BadInputError, match="log.pt"):
            load_log(p)


@pytest.mark.fault
def test_mutated_files_map_the_bytes_torch_saved_or_not_at_all(tmp_path):
    """Random byte flips, cuts and insertions of a log.pt. After flips, whatever maps is
    the bytes where ``torch.save`` put the tensors (torch's own record offsets), as
    damaged; after a cut or an insertion, what ``torch.load`` reads. (Where a flip
    damages a zip directory that Python's zipfile reads whole, torch's stricter reader
    may refuse it, or read other bytes: counted, not compared.)"""
    rng = np.random.default_rng(5)
    te, tr = _pair()
    good = tmp_path / "good.pt"
    torch.save({"logits": te, "logits_train": tr, "code": "x"}, good)
    reader = torch._C.PyTorchFileReader(str(good))
    at = [reader.get_record_offset(f"data/{i}") for i in (0, 1)]
    good = good.read_bytes()
    outcomes = {"mapped": 0, "not mapped": 0, "torch reads otherwise": 0}
    p = tmp_path / "m.pt"
    for _ in range(600):
        op, b = mutate(good, rng)
        p.write_bytes(b)
        got = map_tensors(p, KEYS)
        if got is None:
            outcomes["not mapped"] += 1
            continue
        outcomes["mapped"] += 1
        saved = [np.frombuffer(b, np.float16, t.numel(), o).reshape(t.shape)
                 for t, o in zip((te, tr), at, strict=True)]
        try:
            loaded = torch.load(p, weights_only=True)
            loaded = [loaded[k].numpy() for k in KEYS]
        except Exception:  # noqa: BLE001 -- a damaged directory torch's reader refuses
            loaded = None
        if loaded is None or any(not np.array_equal(x, y, equal_nan=True)
                                 for x, y in zip(loaded, saved, strict=True)):
            outcomes["torch reads otherwise"] += 1
            assert op == 0, "a cut or an insertion that maps must read as torch reads it"
        for g, w in zip(got, saved, strict=True):
            np.testing.assert_array_equal(g, w)
    assert outcomes["mapped"] > 20 and outcomes["not mapped"] > 300, outcomes
