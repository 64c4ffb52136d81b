"""The one-pass GPU standardisation against an exact float64 evaluation: under Triton's
interpreter on the CPU, and on a CUDA device against the torch form too."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kernelscale import fused_gpu
from kernelscale.normalise import Normaliser
from kernelscale.stats import LOG1P32, RunningStats
from tests.conftest import ROOT
from tests.reference import confident_logits, log_softmax_exact64


def _cases():
    """(name, logits (k, n, C), selected classes or None) of every kind the kernel meets."""
    ties = confident_logits(3, 70, 1000, 6, (3.0, 9.0))  # others-sums up to ~999
    ties[0, 0, :] = -3.0
    ties[0, 0, 5] = ties[0, 0, 9] = 4.0  # a tie at the top
    return [
        ("plain", (np.random.default_rng(1).normal(size=(11, 130, 10)) * 4)
         .astype(np.float16), None),
        ("confident", confident_logits(9, 70, 10, 2, (15.0, 25.0)), None),
        # margins past 69 nats: rows evaluated in float64
        ("float64 rows", confident_logits(9, 70, 10, 3, (60.0, 120.0)), [3, 0, 7]),
        ("float32", confident_logits(5, 65, 10, 4, (15.0, 25.0)).astype(np.float32), [1]),
        ("1000 classes", ties, [9, 2, 5]),
    ]


def _moments(case: int, n: int, w: int):
    rng = np.random.default_rng(100 + case)
    return rng.normal(size=(n, w)) * 1e-3, rng.uniform(0.5, 2.0, size=(n, w))


def _want(logits, classes, mean, inv):
    """float64 z-scores (k, n, C') from the exact log-softmax."""
    v = log_softmax_exact64(logits)
    if classes is not None:
        v = v[..., classes]
    return (v - mean) * inv


def _check(got, want, rel=2e-6):
    # relative to each value's own size, and to the z-scores' scale
    err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
    assert float(err.max()) <= rel


_INTERPRETED = """
import json, sys
import numpy as np, torch
from kernelscale import fused_gpu
ins = np.load(sys.argv[1])
res = {}
for i in range(int(ins["count"])):
    raw = torch.from_numpy(ins[f"raw{i}"])
    cls = torch.from_numpy(ins[f"cls{i}"])
    mean, inv = torch.from_numpy(ins[f"mean{i}"]), torch.from_numpy(ins[f"inv{i}"])
    k, n, _ = raw.shape
    out = torch.full((n, k * len(cls) + 3), 7.0)
    fused_gpu.standardise(raw, cls, mean, inv, out)
    res[f"out{i}"] = out.numpy()
np.savez(sys.argv[2], **res)
"""


def test_interpreted_kernel_matches_float64(tmp_path):
    cases = _cases()
    ins = {"count": len(cases)}
    for i, (_, logits, classes) in enumerate(cases):
        cls = np.arange(logits.shape[2]) if classes is None else np.asarray(classes)
        ins[f"raw{i}"] = logits
        ins[f"cls{i}"] = cls.astype(np.int32)
        ins[f"mean{i}"], ins[f"inv{i}"] = _moments(i, logits.shape[1], len(cls))
    np.savez(tmp_path / "in.npz", **ins)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", _INTERPRETED,
                        str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    outs = np.load(tmp_path / "out.npz")
    for i, (name, logits, classes) in enumerate(cases):
        k, n, _ = logits.shape
        w = len(ins[f"cls{i}"])
        out = outs[f"out{i}"]
        assert (out[:, k * w:] == 7.0).all(), name  # columns past k*C' left alone
        got = out[:, :k * w].reshape(n, k, w).transpose(1, 0, 2).astype(np.float64)
        _check(got, _want(logits, classes, ins[f"mean{i}"], ins[f"inv{i}"]))


def test_arguments_that_do_not_fit_are_refused():
    raw = torch.zeros((2, 5, 3), dtype=torch.float16)
    cls = torch.arange(3, dtype=torch.int32)
    m = torch.zeros((5, 3), dtype=torch.float64)
    out = torch.zeros((5, 6))
    for bad in ((raw.transpose(0, 1).contiguous().transpose(0, 1), cls, m, m, out),
                (raw, cls, m[:4], m, out), (raw, cls, m, m, out[:, :5]),
                (raw, cls, m, m, torch.zeros((6, 5)).T), (raw.double(), cls, m, m, out)):
        with pytest.raises(ValueError, match="fused_gpu.standardise"):
            fused_gpu.standardise(*bad)


def test_a_kernel_that_cannot_be_built_gives_way_to_the_torch_form(monkeypatch, capsys):
    """A first launch that fails (no C compiler, say) is said once; that call and every
    later one take the torch form, with the same values."""
    monkeypatch.setenv("KERNELSCALE_FUSED", "0")  # the reference, for both normalisers
    logits = torch.from_numpy(confident_logits(4, 30, 10, 8, (15.0, 25.0)))
    v = log_softmax_exact64(logits.numpy())
    st = RunningStats(count=4, mean=v.mean(0), m2=v.var(0) * 3)
    ref = Normaliser(st, (0, 30), None, torch.device("cpu"), LOG1P32)(logits).clone()
    norm = Normaliser(st, (0, 30), None, torch.device("cpu"), LOG1P32)
    monkeypatch.delenv("KERNELSCALE_FUSED")
    monkeypatch.setattr(fused_gpu, "_failed", None)
    norm._fused_gpu = (torch.arange(10, dtype=torch.int32), norm.mean, norm.inv)
    launches = []

    def broken(*args):
        launches.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC")

    monkeypatch.setattr(fused_gpu, "standardise", broken)
    for _ in range(2):
        assert torch.equal(norm(logits), ref)
    assert launches == [1] and not fused_gpu.enabled()
    err = capsys.readouterr().err
    assert err.count("one-pass z-scores are unavailable (RuntimeError: Failed to find C "
                     "compiler") == 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", range(5))
def test_gpu_kernel_matches_float64_and_the_torch_form(case, monkeypatch):
    name, logits, classes = _cases()[case]
    k, n, c = logits.shape
    w = c if classes is None else len(classes)
    mean, inv = _moments(case, n, w)
    full_mean = np.zeros((n, c))
    full_inv = np.ones((n, c))
    cls = list(range(c)) if classes is None else classes
    full_mean[:, cls], full_inv[:, cls] = mean, inv
    st = RunningStats(count=2, mean=full_mean, m2=1.0 / full_inv**2)
    dev = torch.device("cuda")
    raw = torch.from_numpy(logits).to(dev)

    def z(norm):
        out = torch.full((n, k * w + 3), 7.0, device=dev)
        norm(raw, out=out)
        host = out.cpu().numpy()
        assert (host[:, k * w:] == 7.0).all()
        return host[:, :k * w].reshape(n, k, w).transpose(1, 0, 2).astype(np.float64)

    norm = Normaliser(st, (0, n), classes, dev, LOG1P32)
    assert norm._fused_gpu is not None, name
    got = z(norm)
    np.testing.assert_allclose(norm.inv.cpu().numpy(), inv, rtol=1e-12)
    _check(got, _want(logits, classes, mean, inv))
    monkeypatch.setenv("KERNELSCALE_FUSED", "0")
    ref_norm = Normaliser(st, (0, n), classes, dev, LOG1P32)
    assert ref_norm._fused_gpu is None
    ref = z(ref_norm)
    # the same arithmetic but for the order of the float32 sum: a few ulps
    assert float((np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)).max()) <= 1e-6
    print(json.dumps({"case": name, "max_vs_torch": float(np.abs(got - ref).max())}))
