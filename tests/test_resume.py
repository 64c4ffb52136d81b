"""Kill -9 and SIGTERM during the kernel, in subprocesses; the result must not change."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from tests.conftest import ROOT, ingest_dir, run_cli
from tests.reference import random_source, reference_kernel

ARGS = ["--chunks", "64x256", "--tile", "64x256", "--max-memory", "600K", "--runs-per-step", "2",
        "--checkpoint-every", "0.001", "--device", "cpu"]


@pytest.fixture(scope="module")
def resume_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    test, train = random_source(d / "src", [40, 40], n_test=128, n_train=1024, classes=10,
                                seed=11)
    ingest_dir(d / "src", d / "store", show_progress=False)
    out = d / "clean"
    run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS)
    return d, zarr.open_group(str(out), mode="r")["kernel"][...], test, train


def _ckpt_progress(out):
    """Runs folded in by the newest checkpoint, and number of finished tiles."""
    done = len(list((out / ".done").glob("*.json"))) if (out / ".done").is_dir() else 0
    best = 0
    if (out / ".checkpoints").is_dir():
        for p in (out / ".checkpoints").glob("*.npz"):
            try:
                with np.load(p) as z:
                    import json
                    best = max(best, json.loads(z["meta"].tobytes())["runs_done"])
            except Exception:
                pass
    return best, done


def _start(store, out, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kernelscale", "-q", "kernel", "--store",
                             str(store), "--out", str(out), *ARGS, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at(proc, out, want_runs, want_done):
    """kill -9 ``proc`` once ``want_done`` tiles are finished and the next one's
    checkpoint holds ``want_runs`` runs (or more tiles are finished)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        runs, done = _ckpt_progress(out)
        if done > want_done or (done == want_done and runs >= want_runs):
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"finished before the kill point: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_after_checkpoint(store, out, runs):
    """Start a kernel; kill -9 it once a checkpoint holds ``runs`` runs."""
    proc = _start(store, out)
    while _ckpt_progress(out)[0] < runs and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_clean_run_matches_reference(resume_store):
    _, K, test, train = resume_store
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


@pytest.mark.fault
def test_kill9_at_several_points_then_resume_is_bitwise_identical(resume_store, tmp_path):
    d, clean, *_ = resume_store
    out = tmp_path / "killed"
    # kill points: mid-way through the first tile's runs, after some tiles, later again
    kills = [(20, 0), (0, 3), (30, 5)]
    seen = []
    for want_runs, want_done in kills:
        _kill_at(_start(d / "store", out), out, want_runs, want_done)
        seen.append(_ckpt_progress(out))
    assert len(seen) == 3
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is False
    p = run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS,
                env={"OMP_NUM_THREADS": "1"})
    assert "kernel:" in p.stdout
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True
    np.testing.assert_array_equal(g["kernel"][...], clean)
    assert not (out / ".checkpoints").exists(), "checkpoints are removed when complete"


@pytest.mark.fault
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_stop_signal_checkpoints_and_exits_75_then_resumes(resume_store, tmp_path, sig):
    d, clean, *_ = resume_store
    out = tmp_path / "stopped"
    proc = _start(d / "store", out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _ckpt_progress(out)[0] < 10:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "checkpoint" in err and "re-run to resume" in err
    assert list((out / ".checkpoints").glob("*.npz"))
    p = run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS,
                env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["kernel"][...], clean)


@pytest.mark.fault
def test_checkpoint_of_other_precision_is_refused(resume_store, tmp_path):
    d, *_ = resume_store
    out = tmp_path / "prec"
    _kill_after_checkpoint(d / "store", out, runs=4)
    p = run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS,
                "--precision", "tf32", check=False)
    assert p.returncode == 2
    assert "precision: 'fp32' -> 'tf32'" in p.stderr and "--restart" in p.stderr



def test_checkpoint_from_another_device_resumes_and_says_so(resume_store, tmp_path):
    from kernelscale.output import load_checkpoint, save_checkpoint

    d, clean, *_ = resume_store
    out = tmp_path / "moved"
    _kill_after_checkpoint(d / "store", out, runs=4)
    ckpts = sorted((out / ".checkpoints").glob("*.npz"))
    assert ckpts
    for p in ckpts:  # as if written on a GPU node with another torch
        meta, accs = load_checkpoint(p)
        assert meta["device"]["type"] == "cpu" and "torch" in meta["device"]
        meta["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
                          "cuda": "13.0", "cublas": "13.0.0.19", "capability": "9.0"}
        save_checkpoint(p, meta, accs)
    r = run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS,
                env={"OMP_NUM_THREADS": "1"})
    assert "name NVIDIA H100 80GB HBM3 -> " in r.stderr
    assert "not bitwise identical" in r.stderr
    got = zarr.open_group(str(out), mode="r")["kernel"][...]
    assert np.abs(got - clean).max() <= 1e-6


@pytest.mark.fault
def test_checkpoint_of_other_steps_resumes_and_says_so(resume_store, tmp_path):
    """A checkpoint written with 2 runs per step, resumed with 3 (as after an upgrade
    that plans longer steps): the runs folded are kept, the first step is cut to the
    next boundary, and the result equals the clean run to rounding."""
    d, clean, test, train = resume_store
    out = tmp_path / "steps"
    _kill_after_checkpoint(d / "store", out, runs=4)
    folded = _ckpt_progress(out)[0]
    r = run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *ARGS,
                "--runs-per-step", "3", env={"OMP_NUM_THREADS": "1"})
    assert "runs per step 2 -> 3" in r.stderr and "not bitwise identical" in r.stderr
    assert f"from {folded}/80 runs" in r.stderr
    got = zarr.open_group(str(out), mode="r")["kernel"][...]
    assert np.abs(got - clean).max() <= 1e-6
    assert np.abs(got - reference_kernel(test, train)).max() <= 1e-5


@pytest.mark.fault
def test_topk_kernel_killed_at_several_points_resumes_bitwise(resume_store, tmp_path):
    """A top-K kernel (partials written per tile, merged at the end) killed mid-pass,
    between tiles and again later, then resumed: the same bytes as an uninterrupted one,
    and each row's top-K of the full kernel."""
    d, clean, *_ = resume_store
    args = [*ARGS, "--topk", "9"]
    whole = tmp_path / "whole"
    run_cli("kernel", "--store", str(d / "store"), "--out", str(whole), *args,
            env={"OMP_NUM_THREADS": "1"})
    out = tmp_path / "killed"
    for want_runs, want_done in [(20, 0), (0, 3), (30, 6)]:
        _kill_at(_start(d / "store", out, "--topk", "9"), out, want_runs, want_done)
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    run_cli("kernel", "--store", str(d / "store"), "--out", str(out), *args,
            env={"OMP_NUM_THREADS": "1"})
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(whole), mode="r")
    assert a.attrs["complete"] is True
    for name in ("values", "indices"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    order = np.lexsort((np.broadcast_to(np.arange(clean.shape[1]), clean.shape), -clean),
                       axis=1)[:, :9]
    np.testing.assert_array_equal(a["indices"][...], order)
    np.testing.assert_array_equal(a["values"][...], np.take_along_axis(clean, order, axis=1))
