"""The Python API (kernelscale.api and the lazy package namespace)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kernelscale
from kernelscale.errors import BadInputError, ConfigError, KernelscaleError
from tests.reference import labels_file, reference_kernel

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- the README

def readme_api_code() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Python API\n" in text, "README has no '## Python API' section"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(readme_api_code(), "README.md:python-api", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "kernel 3-NN" in out and "nearest train labels" in out


# ---------------------------------------------------------- kernel_from_arrays

def _logits(runs: int, n: int, classes: int, seed: int, margin: float = 2.0) -> np.ndarray:
    """Correlated random logits (runs, n, classes) float64 with a per-example mean."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, classes)) * margin
    w = rng.normal(size=(runs, classes, classes)) * 0.3 + np.eye(classes)
    return base @ w + rng.normal(size=(runs, n, classes))


def _confident(runs: int, n: int, classes: int, seed: int) -> np.ndarray:
    """Logits whose top class wins by a margin of 10..18 (top log-softmax ~1e-5..1e-8)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(runs, n, classes))
    top = rng.integers(0, classes, n)
    x[:, np.arange(n), top] += rng.uniform(10, 18, size=n)
    return x


def _with_constant_row(x: np.ndarray, i: int) -> np.ndarray:
    """Example ``i`` gets the same logits in every run: log-softmax (0, -100, ...) exactly,
    so every class of it has zero variance (its kernel row/column must be exactly 0)."""
    x = x.copy()
    x[:, i, :] = 0.0
    x[:, i, 0] = 100.0
    return x


CASES = {
    "random": lambda: (_logits(23, 17, 5, 1), _logits(23, 29, 5, 2)),
    "confident": lambda: (_confident(31, 12, 10, 3), _confident(31, 40, 10, 4)),
    "zero-variance": lambda: (_with_constant_row(_logits(9, 11, 4, 5), 3),
                              _with_constant_row(_logits(9, 13, 4, 6), 0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["numpy64", "numpy32", "numpy16", "torch32", "torch16",
                                  "torch-bf16"])
def test_kernel_from_arrays_matches_reference(case: str, kind: str) -> None:
    test, train = CASES[case]()
    np_dtype = {"numpy64": np.float64, "numpy32": np.float32, "numpy16": np.float16,
                "torch32": np.float32, "torch16": np.float16, "torch-bf16": np.float32}[kind]
    test, train = test.astype(np_dtype), train.astype(np_dtype)
    if kind.startswith("torch"):
        tdt = {"torch32": torch.float32, "torch16": torch.float16,
               "torch-bf16": torch.bfloat16}[kind]
        a, b = torch.from_numpy(test).to(tdt), torch.from_numpy(train).to(tdt)
        # the reference sees exactly the values the API sees
        test, train = a.double().numpy(), b.double().numpy()
    else:
        a, b = test, train
    want = reference_kernel(test, train)
    got = kernelscale.kernel_from_arrays(a, b)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    if case == "zero-variance":
        assert not np.any(got[3, :]) and not np.any(got[:, 0])


def test_kernel_from_arrays_chunks_square_and_raw() -> None:
    test, train = _logits(17, 8, 6, 7).astype(np.float16), _logits(17, 10, 6, 8)
    want = reference_kernel(test, train)
    for chunk in (1, 2, 5, 17, 100):
        got = kernelscale.kernel_from_arrays(test, train, runs_per_step=chunk)
        assert np.abs(got - want).max() <= 1e-5, chunk
    # the same object twice: a square (train x train) kernel, standardised once
    sq = kernelscale.kernel_from_arrays(train, train, runs_per_step=4)
    assert np.abs(sq - reference_kernel(train, train)).max() <= 1e-5
    assert np.allclose(sq, sq.T, atol=1e-6)
    # a tensor that requires grad is read without autograd
    grad = kernelscale.kernel_from_arrays(torch.from_numpy(test.astype(np.float64)),
                                          torch.from_numpy(train).requires_grad_())
    assert np.abs(grad - want).max() <= 1e-5
    # raw logits instead of their log-softmax
    raw = kernelscale.kernel_from_arrays(test, train, log_softmax=False)
    assert np.abs(raw - reference_kernel(test, train, log_softmax=False)).max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("tf32", 2e-3)])
def test_kernel_from_arrays_cuda(precision: str, tol: float) -> None:
    test, train = _confident(64, 200, 10, 9), _logits(64, 500, 10, 10)
    want = reference_kernel(test, train)
    got = kernelscale.kernel_from_arrays(torch.from_numpy(test).cuda(), train, device="cuda",
                                         precision=precision)
    assert np.abs(got - want).max() <= tol


@pytest.mark.parametrize("bad,match", [
    (lambda t, r: (t[0], r), "3-D"),
    (lambda t, r: (t[:5], r), "runs"),
    (lambda t, r: (t[..., :3], r), "classes"),
    (lambda t, r: (t[:1], r[:1]), "at least 2 runs"),
    (lambda t, r: (t.astype(np.int64), r), "floating point"),
    (lambda t, r: (t, np.where(np.arange(r.shape[0])[:, None, None] == 4, np.nan, r)),
     "run 4"),
    (lambda t, r: (t, np.where(np.arange(r.shape[0])[:, None, None] == 2, np.inf, r)),
     "non-finite"),
    (lambda t, r: (t[:, :0], r), "empty"),
])
def test_kernel_from_arrays_bad_input(bad, match: str) -> None:
    test, train = _logits(6, 5, 4, 11), _logits(6, 7, 4, 12)
    a, b = bad(test, train)
    with pytest.raises(BadInputError, match=match):
        kernelscale.kernel_from_arrays(a, b)


def test_kernel_from_arrays_bad_options() -> None:
    x = _logits(4, 3, 3, 13)
    with pytest.raises(ConfigError, match="precision"):
        kernelscale.kernel_from_arrays(x, x, precision="bf16")
    with pytest.raises(ConfigError, match="runs_per_step"):
        kernelscale.kernel_from_arrays(x, x, runs_per_step=0)


# ------------------------------------------------------------ the package namespace

def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_import_is_cheap() -> None:
    out = _python("import sys, kernelscale; print(kernelscale.__version__); "
                  "print(sorted(m for m in ('torch', 'zarr', 'dask', 'xarray', 'kernelscale.api')"
                  " if m in sys.modules))")
    version, loaded = out.splitlines()
    from kernelscale.version import __version__

    assert version == __version__ == kernelscale.__version__
    assert loaded == "[]"


@pytest.mark.parametrize("first", ["package", "module"])
def test_api_functions_whatever_is_imported_first(first: str) -> None:
    """The API's ``evaluate``/``ingest``/``simulate`` are functions; the stage modules
    (``evaluation``, ``ingestion``, ``simulation``) never shadow them."""
    pre = ("import kernelscale.simulation, kernelscale.evaluation, kernelscale.ingestion; "
           if first == "module" else "")
    out = _python(
        "import kernelscale, inspect, types; " + pre +
        "from kernelscale import simulation as sim; from kernelscale.simulation import SUBDIR; "
        "assert isinstance(sim, types.ModuleType) and hasattr(sim, '_runs'); "
        "assert all(isinstance(getattr(kernelscale, n), types.FunctionType) "
        "for n in ('evaluate', 'ingest', 'simulate')); "
        "print(list(inspect.signature(kernelscale.evaluate).parameters)[:3]); "
        "print(kernelscale.open_kernel.__module__)")
    assert out.splitlines() == ["['store', 'kernel', 'labels']", "kernelscale.api"]


def test_public_names() -> None:
    for name in kernelscale.__all__:
        assert getattr(kernelscale, name) is not None
    assert set(kernelscale.__all__) <= set(dir(kernelscale))
    with pytest.raises(AttributeError):
        kernelscale.no_such_name  # noqa: B018


def test_only_the_package_imports_api() -> None:
    for path in sorted((ROOT / "kernelscale").rglob("*.py")):
        if path == ROOT / "kernelscale" / "__init__.py":
            continue
        text = path.read_text()
        assert not re.search(r"from\s+\.+\s+import\s+api\b|from\s+\.+api\s+import|"
                             r"kernelscale\.api\b|from\s+kernelscale\s+import", text), path


# ---------------------------------------------------------------- a saved kernel

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A simulated ensemble, its store and its test-train and train-train kernels."""
    d = tmp_path_factory.mktemp("api")
    kernelscale.simulate(d / "sim", runs=12, files=2, n_train=90, n_test=40, classes=5,
                         seed=3, progress=False)
    kernelscale.ingest(d / "sim", d / "store")
    kernelscale.compute_kernel(d / "store", d / "kernel", device="cpu", chunks=(16, 32))
    kernelscale.compute_kernel(d / "store", d / "ktrain", device="cpu", pairs="train-train")
    return d


def test_open_kernel_views_agree(pipeline) -> None:
    d = pipeline
    view = kernelscale.open_kernel(d / "kernel")
    assert view.shape == (40, 90) and view.pairs == "test-train" and view.runs == 12
    assert view.dims == ("test", "train") and view.chunks == (16, 32)
    assert view.store_path == (d / "store").resolve()
    assert view.identity["runs"] == 12 and view.identity["shape"] == [40, 90]
    k = view.numpy()
    assert k.dtype == np.float32 and k.flags.c_contiguous
    t = view.torch()
    assert t.dtype == torch.float32 and np.array_equal(t.numpy(), k)
    dk = view.dask()
    assert dk.chunksize == (16, 32) and np.array_equal(dk.compute(), k)
    assert np.array_equal(view[3:7, 10:20], k[3:7, 10:20])
    assert np.array_equal(np.asarray(view), k)
    store = kernelscale.open_store(d / "store")
    test, train = store.read("test", 0, store.runs), store.read("train", 0, store.runs)
    assert np.abs(kernelscale.kernel_from_arrays(test, train) - k).max() <= 1e-5
    assert np.abs(reference_kernel(test, train) - k).max() <= 1e-5
    # array-likes read by run slices (the store's Zarr arrays)
    assert np.abs(kernelscale.kernel_from_arrays(store.array("test"), store.array("train"))
                  - k).max() <= 1e-5
    # neighbours from a path, a view, an ndarray, a tensor and a dask array agree
    nbs = [kernelscale.neighbours(x, 4) for x in (d / "kernel", str(d / "kernel"), view, k,
                                                    t, dk)]
    for nb in nbs[1:]:
        assert np.array_equal(nb.index, nbs[0].index)
        assert np.array_equal(nb.values, nbs[0].values)
    assert nbs[0].index.shape == (40, 4)
    assert np.array_equal(nbs[0].values[:, 0], k.max(axis=1))


def test_square_kernel_views(pipeline) -> None:
    d = pipeline
    view = kernelscale.open_kernel(d / "ktrain")
    assert view.pairs == "train-train" and view.dims == ("train", "train_col")
    assert view.shape == (90, 90)
    store = kernelscale.open_store(d / "store")
    train = store.read("train", 0, store.runs)
    assert np.abs(kernelscale.kernel_from_arrays(train, train) - view.numpy()).max() <= 1e-5
    nb = kernelscale.neighbours(view, 3, exclude_diagonal=True)
    assert not np.any(nb.index == np.arange(90)[:, None])
    import zarr

    assert tuple(zarr.open_array(str(d / "ktrain" / "kernel"), mode="r").metadata
                 .dimension_names) == ("train", "train_col")


def test_xarray_views(pipeline) -> None:
    xr = pytest.importorskip("xarray")
    d = pipeline
    view = kernelscale.open_kernel(d / "kernel")
    da = view.xarray(labels=d / "sim" / "labels.npz")
    assert da.dims == ("test", "train") and da.dtype == np.float32
    assert np.array_equal(da.values, view.numpy())
    with np.load(d / "sim" / "labels.npz") as z:
        assert np.array_equal(da.test_label.values, z["test"])
        assert np.array_equal(da.train_label.values, z["train"])
    assert da.attrs["pairs"] == "test-train" and da.attrs["runs"] == 12
    assert int(da.sel(test=5, train=7)) == int(view.numpy()[5, 7])
    lazy = view.xarray(lazy=True)
    assert lazy.chunks == ((16, 16, 8), (32, 32, 26))
    assert np.array_equal(lazy.values, view.numpy())
    sq = kernelscale.open_kernel(d / "ktrain").xarray(
        labels={"train": np.zeros(90, dtype=np.int64), "test": np.zeros(40, dtype=np.int64)})
    assert sq.dims == ("train", "train_col") and "train_col_label" in sq.coords
    # the Zarr dimension names: xarray.open_zarr gives labelled dims directly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: ".done is not a Zarr node"
        ds = xr.open_zarr(d / "kernel", consolidated=False)
        logits = xr.open_zarr(d / "store", group="logits", consolidated=False)
    assert ds["kernel"].dims == ("test", "train")
    assert logits["test"].dims == ("run", "test", "class")
    assert logits["train"].dims == ("run", "train", "class")
    assert dict(logits.sizes) == {"run": 12, "test": 40, "train": 90, "class": 5}


def test_xarray_missing(pipeline, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(KernelscaleError, match=r"pip install kernelscale\[xarray\]"):
        kernelscale.open_kernel(pipeline / "kernel").xarray()


def test_evaluate_accepts_paths_labels_and_views(pipeline) -> None:
    from kernelscale.labels import load_labels

    d = pipeline
    lab_path = d / "sim" / "labels.npz"
    a = kernelscale.evaluate(d / "store", d / "kernel", lab_path)
    b = kernelscale.evaluate(kernelscale.open_store(d / "store"),
                             kernelscale.open_kernel(d / "kernel"), load_labels(str(lab_path)))
    with np.load(lab_path) as z:
        c = kernelscale.evaluate(str(d / "store"), str(d / "kernel"),
                                 {"train": z["train"], "test": z["test"]}, k=3)
    def scores(ev) -> dict:
        d = ev.as_json()
        d.pop("provenance", None)
        return d

    assert scores(a) == scores(b) == scores(c)
    assert a.runs == 12 and 0 <= a.knn_accuracy <= 100
    with pytest.raises(BadInputError, match="test labels"):
        kernelscale.evaluate(d / "store", d / "kernel",
                             labels_file(d / "wrong.npz", n_train=90, n_test=39, classes=5))


def test_unknown_options_and_unfinished_kernels(pipeline, tmp_path) -> None:
    d = pipeline
    with pytest.raises(ConfigError, match="unknown option.*tilez"):
        kernelscale.compute_kernel(d / "store", tmp_path / "k", tilez=(1, 1))
    with pytest.raises(ConfigError, match="unknown option.*nope"):
        kernelscale.ingest(d / "sim", tmp_path / "s", nope=1)
    kernelscale.compute_kernel(d / "store", tmp_path / "part", rows=(0, 16), chunks=(16, 90))
    with pytest.raises(KernelscaleError, match="not complete"):
        kernelscale.open_kernel(tmp_path / "part")
    part = kernelscale.open_kernel(tmp_path / "part", require_complete=False)
    full = kernelscale.open_kernel(d / "kernel").numpy()
    assert np.array_equal(part[0:16], full[0:16])
    with pytest.raises(BadInputError, match="2-D"):
        kernelscale.neighbours(np.zeros(5), 1)
    with pytest.raises(BadInputError, match="lacks 'test'"):
        kernelscale.evaluate(d / "store", d / "kernel", {"train": np.zeros(90, dtype=int)})
