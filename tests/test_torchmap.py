"""``torch.save`` files mapped without torch: the arrays ``torch.load`` gives, or None
(the caller then takes ``torch.load``)."""

import collections
import io
import pickle
import warnings
import zipfile

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


def _requires_grad(path):
    te, tr = (t.float().requires_grad_() for t in _pair())
    return _save(path, {"logits": te.permute(1, 0, 2).detach().contiguous().permute(1, 0, 2)
                        .requires_grad_(), "logits_train": tr})


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
@pytest.mark.parametrize("make", [_legacy, _permuted, _requires_grad, _bfloat16, _other_global,
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
        np.testing.assert_array_equal(log.test, want[KEYS[0]].detach().numpy())
        np.testing.assert_array_equal(log.train, want[KEYS[1]].detach().numpy())
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


class _Storage:
    """Pickled as the persistent id torch.save gives a storage."""

    def __init__(self, key: str, cls, numel: int):
        self.key, self.cls, self.numel = key, cls, numel


class _Tensor:
    """Pickled as torch.save pickles a tensor; ``state``: a BUILD after the call."""

    def __init__(self, storage, offset, shape, stride, state=None):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        call = (torch._utils._rebuild_tensor_v2, self.args)
        return call if self.state is None else (*call, self.state)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _craft(path, tensors: dict, storages: dict, protocol: int = 2, twice: str | None = None):
    """A torch.save-like zip of ``tensors`` (a dict pickled as torch.save does) and the
    ``storages`` (key -> bytes); ``twice``: a storage key written a second time."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", "little")
            for k, b in storages.items():
                z.writestr(f"archive/data/{k}", b)
            if twice is not None:
                z.writestr(f"archive/data/{twice}", bytes(len(storages[twice])))
            z.writestr("archive/version", "3\n")
    return path


def _crafted(path, *, offset=0, numel=None, state=None, protocol=2, twice=None,
             dtypes=("HalfStorage", "HalfStorage")):
    te = np.arange(24, dtype=np.float16) / 8
    tr = np.arange(40, dtype=np.float16) / 16
    raw = {"0": te.tobytes() + tr.tobytes()}
    s0 = _Storage("0", getattr(torch, dtypes[0]), numel or 64)
    s1 = _Storage("0", getattr(torch, dtypes[1]), numel or 64)
    return _craft(path, {"logits": _Tensor(s0, offset, (2, 3, 4), (12, 4, 1), state),
                         "logits_train": _Tensor(s1, 24, (2, 5, 4), (20, 4, 1))},
                  raw, protocol, twice), te.reshape(2, 3, 4), tr.reshape(2, 5, 4)


def test_a_crafted_plain_file_maps_as_torch_loads_it(tmp_path):
    p, te, tr = _crafted(tmp_path / "log.pt")
    got = map_tensors(p, KEYS)
    want = torch.load(p, weights_only=True)
    np.testing.assert_array_equal(got[0], te)
    np.testing.assert_array_equal(got[1], tr)
    np.testing.assert_array_equal(want["logits"].numpy(), te)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", [
    {"offset": -10}, {"offset": -1_000_000}, {"numel": 100}, {"state": (1, 2)},
    {"protocol": 4}, {"twice": "0"}, {"dtypes": ("HalfStorage", "FloatStorage")}])
def test_what_torch_reads_otherwise_is_not_mapped(tmp_path, case):
    """A negative offset, a storage of another size than declared, a BUILD after the
    call, opcodes torch's weights-only loader does not read, a member twice, a storage
    viewed as two dtypes: torch refuses or reads them its own way, so they go to it."""
    p, _, _ = _crafted(tmp_path / "log.pt", **case)
    assert map_tensors(p, KEYS) is None
    try:  # as load_log calls it (memory-mapped: the storage's size is not checked)
        want = torch.load(p, weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- torch refuses it: so does load_log
        with pytest.raises(BadInputError, match="log.pt"):
            load_log(p)
        return
    log = load_log(p)
    np.testing.assert_array_equal(log.test, want["logits"].numpy())
    np.testing.assert_array_equal(log.train, want["logits_train"].numpy())
