"""Faults of the machine: a full disk, a read-only or forbidden folder. One line each,
no traceback, nothing committed lost, and the same command resumes once the cause is
gone."""

import os
import subprocess

import numpy as np
import pytest

from kernelscale.store import Store
from tests.conftest import ingest_dir, run_cli
from tests.reference import random_source

pytestmark = pytest.mark.fault


def _mount_tmpfs(path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "a disk-full test mounts a small tmpfs and needs root"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "600k")
    if why:
        pytest.skip(why)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_disk_full_is_one_line_and_the_same_command_resumes(small_disk, tmp_path):
    src = tmp_path / "src"
    test, train = random_source(src, [30, 30, 30, 30], n_test=200, n_train=600)
    store = small_disk / "store"
    r = run_cli("ingest", str(src), "--store", str(store), check=False)
    assert r.returncode == 74, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(small_disk) in r.stderr
    s = Store.open(store)
    committed = s.runs
    assert 0 < committed < 120
    np.testing.assert_array_equal(s.read("train", 0, committed), train[:committed])
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    r = run_cli("ingest", str(src), "--store", str(store))
    s = Store.open(store)
    assert s.runs == 120
    np.testing.assert_array_equal(s.read("train", 0, 120), train)
    whole = tmp_path / "whole"
    ingest_dir(src, whole, show_progress=False)
    np.testing.assert_array_equal(Store.open(whole).stats("train").m2, s.stats("train").m2)
    assert run_cli("verify", str(store)).returncode == 0


def test_a_read_only_or_forbidden_folder_is_one_line(tmp_path):
    """As root: a read-only tmpfs (EROFS); as a user: a folder without write permission
    (EACCES). Either way one line naming the cause."""
    src = tmp_path / "src"
    random_source(src, [5])
    target = tmp_path / "ro"
    if os.geteuid() == 0:
        why = _mount_tmpfs(target, "1m")
        if why:
            pytest.skip(why)
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        want = "Read-only file system"
    else:
        target.mkdir()
        target.chmod(0o555)
        want = "Permission denied"
    try:
        r = run_cli("ingest", str(src), "--store", str(target / "store"), check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(target)], check=False)
        else:
            target.chmod(0o755)
    assert r.returncode == 74 and want in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_disk_full_under_a_kernel_is_one_line_and_the_same_command_resumes(small_disk,
                                                                           tmp_path):
    """The kernel's output on a full disk: one line, exit 74; with space again the same
    command finishes, equal to a kernel computed on a roomy disk."""
    src = tmp_path / "src"
    random_source(src, [10, 10], n_test=300, n_train=1000)  # a 1.2 MB kernel, 600 kB disk
    store = tmp_path / "store"
    ingest_dir(src, store, show_progress=False)
    out = small_disk / "k"
    args = ("kernel", "--store", str(store), "--out", str(out), "--device", "cpu",
            "--chunks", "32x64", "--tile", "32x64")
    r = run_cli(*args, check=False)
    assert r.returncode == 74, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    run_cli(*args)
    ref = tmp_path / "ref"
    run_cli("kernel", "--store", str(store), "--out", str(ref), "--device", "cpu",
            "--chunks", "32x64", "--tile", "32x64")
    import zarr

    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["kernel"][...],
                                  zarr.open_group(str(ref), mode="r")["kernel"][...])
    assert run_cli("verify", str(out)).returncode == 0
