"""Synthetic ensembles in the Hugging Face Hub dataset's file layout.

:func:`simulate` writes ``runs`` training runs of a latent-feature model, as ``files``
``log.pt`` files, plus the labels::

    OUT/logs_saveoutputs_main/<uuid4>/log.pt   # torch.save'd dict, one per file:
        'logits'       torch.float16 (runs_in_file, n_test,  classes)
        'logits_train' torch.float16 (runs_in_file, n_train, classes)
        'code'         str, the simulator, its parameters and the file's run range
    OUT/labels.npz                              # int64 'train' (n_train,), 'test' (n_test,),
                                                # str 'class_names' (classes,): sim-0 .. sim-(C-1)

The model (``D`` latent dimensions, ``S`` sub-clusters per class, ``C`` classes)::

    mu_c        ~ N(0, I/D)                               class directions = the learnt readout
    m_cs        = a_cs mu_c + g_cs mu_o(c,s) + sqrt(1 - a_cs^2 - g_cs^2) nu_cs,  nu_cs ~ N(0, I/D)
    h_i         = m_(y_i, s_i) + sigma_w eps_i,            eps_i ~ N(0, I/D)
    W_r         = beta (mu^T + tau E_r),                   E_r ~ N(0, 1)^(D x C)
    logits[r,i] = h_i W_r + sigma_n xi_ri  (+ m onehot(y_i) for train examples)
    xi_ri       ~ N(0, I_C), except for a test near-duplicate i of train example j:
    xi_ri       = rho xi_rj + sqrt(1 - rho^2) xi'_ri

Sub-cluster 0 of a class is typical (weight 1/2, ``a = 0.8``); the others are atypical
(``a ~ U(0.4, 0.8)``) and lean towards a random other class ``o(c,s)`` (``g ~ U(0, 0.4)``),
so the shared readout ``mu`` misclassifies part of them.  ``E_r`` is one run's idiosyncrasy:
it acts on train and test alike, so the across-run correlation of two examples' outputs
tracks the similarity of their latent features (and the kernel k-NN can exploit the
sub-cluster structure the linear readout misses), while ``xi`` is per-run per-example
noise that the ensemble averages away and that makes the kernel noisy at few runs.
``m`` is memorisation: train examples get a larger margin on their label.  10% of test
examples are near-duplicates of distinct random train examples: same label, latent
feature perturbed by ``0.05 eps``, and the same fine detail, i.e. ``xi`` (a run's response
to what the latent features do not describe) shared with correlation ``rho = 0.9``, so a
near-duplicate's kernel row peaks clearly at its source.

Determinism: every random draw comes from ``numpy.random.SeedSequence(seed, spawn_key=...)``
streams, one for the data set, one per run and one per file name, so the same arguments
give byte-identical files, and run ``r`` is the same whatever ``files`` is.  The content of
a file does not depend on where it lies on disk: the uuid names are random (seeded), so
sorted paths are not in generation order; ``code`` records each file's run range.
"""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .errors import ConfigError

__all__ = ["SimulationError", "SimulationSummary", "simulate", "class_names", "SUBDIR",
           "MODEL_VERSION"]

#: Folder of the run files inside ``out``, as on the Hub.
SUBDIR = "logs_saveoutputs_main"
#: Bumped whenever the model changes the logits written for given arguments.
MODEL_VERSION = 1

# Model constants (see the module docstring).  Tuned so that at n_train=2000, n_test=500,
# classes=10: single ~77% < ensemble ~80% < kernel 3-NN at 200 runs ~85%, with the kernel
# k-NN below the ensemble up to ~20-50 runs.
_D = 64  # latent dimensions
_S = 5  # sub-clusters per class
_P_TYPICAL = 0.5  # weight of sub-cluster 0
_A_TYPICAL = 0.8
_A_RANGE = (0.4, 0.8)  # class-direction weight of the atypical sub-clusters
_G_MAX = 0.4  # lean towards another class of the atypical sub-clusters
_SIGMA_W = 1.7  # within-sub-cluster spread
_BETA = 8.0  # logit scale
_TAU = 0.03  # per-run readout perturbation (shared by train and test)
_SIGMA_N = 0.6  # per-run per-example logit noise
_MEMORISE = 6.0  # extra train margin on the true label
_DUP_FRACTION = 0.1
_DUP_EPS = 0.05
_DUP_RHO = 0.9  # correlation of a near-duplicate's per-run noise with its source's

# spawn_key streams of the SeedSequence
_STREAM_DATA, _STREAM_RUN, _STREAM_NAME = 0, 1, 2


class SimulationError(ConfigError, ValueError):
    """Invalid simulation arguments, or an output folder holding another simulation."""


@dataclass(frozen=True)
class SimulationSummary:
    """What :func:`simulate` wrote.  ``files`` are in generation order (run ranges ascending)."""

    out: Path
    files: tuple[Path, ...]
    runs: int
    n_train: int
    n_test: int
    classes: int
    seed: int


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SimulationError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SimulationError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _split(runs: int, files: int) -> list[int]:
    q, r = divmod(runs, files)
    return [q + (i < r) for i in range(files)]


def _dataset(seed: int, n_train: int, n_test: int, classes: int):
    """Labels, latent features and readout; the part shared by every run.

    Returns ``y_train`` int64 (n_train,), ``y_test`` int64 (n_test,), ``h_train`` float64
    (n_train, D), ``h_test`` float64 (n_test, D), ``mu`` float64 (C, D), and the
    near-duplicates: test indices ``dup`` int64 (n_dup,) and their train sources ``src``.
    """
    rng = _rng(seed, _STREAM_DATA)
    C, S, D = classes, _S, _D
    mu = rng.normal(size=(C, D)) / np.sqrt(D)
    nu = rng.normal(size=(C, S, D)) / np.sqrt(D)
    a = np.concatenate([np.full((C, 1), _A_TYPICAL), rng.uniform(*_A_RANGE, size=(C, S - 1))], 1)
    g = np.concatenate([np.zeros((C, 1)), rng.uniform(0.0, _G_MAX, size=(C, S - 1))], 1)
    other = (np.arange(C)[:, None] + rng.integers(1, C, size=(C, S))) % C
    # floor keeps every centre at norm ~1 with an own direction, even where a^2 + g^2 > 1
    rest = np.sqrt(np.clip(1.0 - a**2 - g**2, 0.05, None))
    centres = a[..., None] * mu[:, None] + g[..., None] * mu[other] + rest[..., None] * nu
    weights = np.array([_P_TYPICAL] + [(1 - _P_TYPICAL) / (S - 1)] * (S - 1))

    def draw(n: int):
        y = rng.integers(C, size=n)
        s = rng.choice(S, size=n, p=weights)
        return y, centres[y, s] + _SIGMA_W * rng.normal(size=(n, D)) / np.sqrt(D)

    y_train, h_train = draw(n_train)
    y_test, h_test = draw(n_test)
    n_dup = int(round(_DUP_FRACTION * n_test))
    dup = rng.choice(n_test, n_dup, replace=False)
    src = rng.choice(n_train, n_dup, replace=n_dup > n_train)
    y_test[dup] = y_train[src]
    h_test[dup] = h_train[src] + _DUP_EPS * rng.normal(size=(n_dup, D)) / np.sqrt(D)
    return (y_train.astype(np.int64), y_test.astype(np.int64), h_train, h_test, mu,
            dup.astype(np.int64), src.astype(np.int64))


def _runs(seed: int, start: int, stop: int, data) -> tuple[np.ndarray, np.ndarray]:
    """Logits of runs ``[start, stop)``: float16 (n, n_test, C) and (n, n_train, C)."""
    y_train, _, h_train, h_test, mu, dup, src = data
    n, C = stop - start, mu.shape[0]
    test = np.empty((n, h_test.shape[0], C), np.float16)
    train = np.empty((n, h_train.shape[0], C), np.float16)
    rows = np.arange(h_train.shape[0])
    for k, r in enumerate(range(start, stop)):
        # one stream per run: a run's logits do not depend on how runs are split into files
        rng = _rng(seed, _STREAM_RUN, r)
        w = _BETA * (mu.T + _TAU * rng.normal(size=(_D, C)))
        xi_train = rng.normal(size=(h_train.shape[0], C))
        xi_test = rng.normal(size=(h_test.shape[0], C))
        xi_test[dup] = _DUP_RHO * xi_train[src] + np.sqrt(1 - _DUP_RHO**2) * xi_test[dup]
        out = h_train @ w + _SIGMA_N * xi_train
        out[rows, y_train] += _MEMORISE  # in place of a (n_train, C) one-hot margin
        train[k] = out
        test[k] = h_test @ w + _SIGMA_N * xi_test
    return test, train


def class_names(classes: int) -> np.ndarray:
    """Names of the simulated classes, str (classes,): ``sim-0`` .. ``sim-9`` for ten,
    zero-padded to one width (``sim-000`` .. ``sim-999`` for a thousand)."""
    width = len(str(classes - 1))
    return np.array([f"sim-{c:0{width}d}" for c in range(classes)])


def _code(seed: int, runs: int, n_train: int, n_test: int, classes: int, start: int,
          stop: int) -> str:
    return (f"kernelscale.simulation latent-feature model v{MODEL_VERSION}: seed={seed} "
            f"runs={runs} n_train={n_train} n_test={n_test} classes={classes} "
            f"file_runs=[{start},{stop}) D={_D} S={_S} sigma_w={_SIGMA_W} beta={_BETA} "
            f"tau={_TAU} sigma_n={_SIGMA_N} memorise={_MEMORISE} dup={_DUP_FRACTION} "
            f"rho={_DUP_RHO}")


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    # np.savez stamps the current time into the zip entries; fixed stamps keep bytes stable
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _torch_bytes(obj: dict) -> bytes:
    import torch

    # to a buffer, not a file: torch names the zip's records after the file it writes
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def simulate(out: str | os.PathLike, *, runs: int = 200, files: int = 2, n_train: int = 2000,
             n_test: int = 500, classes: int = 10, seed: int = 0,
             progress: bool = True) -> SimulationSummary:
    """Write a synthetic ensemble of ``runs`` runs in ``files`` files under ``out``.

    Runs are split as evenly as possible, earlier files taking the remainder.  Each file is
    generated, serialised and written (atomically) before the next one, so memory holds one
    file's logits (``2 * runs_in_file * (n_train + n_test) * classes`` bytes), one run's
    float64 work arrays (``~24 * (n_train + n_test) * classes`` bytes) and the latent
    features (``8 * 64 * (n_train + n_test)`` bytes).  ``classes`` is any count >= 2;
    ``labels.npz`` names them (:func:`class_names`) and is written last: its presence
    marks a complete simulation.  The model's constants are tuned at ten classes; with
    more classes and the same examples per class, every accuracy is lower (the ``D = 64``
    class directions overlap more) and the kernel k-NN needs more train examples per class
    to pass the ensemble.  Rewriting the same arguments into
    ``out`` replaces the files in place; any other ``log.pt`` under ``out/SUBDIR`` raises
    :class:`SimulationError` before anything is written (a reader would mix it in).
    """
    runs = _check_int("runs", runs, 1)
    files = _check_int("files", files, 1)
    n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 1)
    classes = _check_int("classes", classes, 2)
    seed = _check_int("seed", seed, 0)
    if files > runs:
        raise SimulationError(f"files ({files}) > runs ({runs}): every file needs >= 1 run")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SimulationError(f"{out}: exists and is not a directory")

    names = []
    for f in range(files):
        raw = _rng(seed, _STREAM_NAME, f).bytes(16)
        names.append(str(uuid.UUID(bytes=raw, version=4)))
    paths = [out / SUBDIR / name / "log.pt" for name in names]
    root = out / SUBDIR
    if root.is_dir():
        stale = sorted(p for p in root.glob("**/log.pt") if p not in set(paths))
        if stale:
            raise SimulationError(f"{out}: holds {len(stale)} log.pt file(s) of another "
                                  f"simulation or source (e.g. {stale[0]}); use an empty folder")

    import torch

    data = _dataset(seed, n_train, n_test, classes)
    bounds = np.concatenate([[0], np.cumsum(_split(runs, files))]).tolist()
    from .progress import progress as progress_bar

    bar = progress_bar(files, "simulate", "file", enabled=progress)
    for f in range(files):
        start, stop = bounds[f], bounds[f + 1]
        test, train = _runs(seed, start, stop, data)
        blob = _torch_bytes({
            "logits": torch.from_numpy(test),
            "logits_train": torch.from_numpy(train),
            "code": _code(seed, runs, n_train, n_test, classes, start, stop),
        })
        del test, train
        paths[f].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(paths[f], blob)
        del blob
        bar.update(1)
    bar.close()
    y_train, y_test = data[0], data[1]
    atomic_write_bytes(out / "labels.npz", _npz_bytes(train=y_train, test=y_test,
                                                      class_names=class_names(classes)))
    return SimulationSummary(out=out, files=tuple(paths), runs=runs, n_train=n_train,
                             n_test=n_test, classes=classes, seed=seed)
