"""Faults of the machine: a full disk, a read-only or forbidden folder. One line each,
no traceback, nothing committed lost, and the same command resumes once the cause is
gone. And a Slurm gather killed (kill -9, SIGTERM) or out of disk at points of its
evaluate, curve and report stages: run again, it gives what an uninterrupted one gives."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kernelscale.store import Store
from tests.conftest import ROOT, ingest_dir, run_cli
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


def _tmpfs(path, size: str):
    """A tmpfs of ``size`` at ``path`` for the test's duration (skipped with the reason
    where none can be mounted)."""
    why = _mount_tmpfs(path, size)
    if why:
        pytest.skip(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path / "disk", "600k")


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


# ------------------------------------------------------------------ Slurm gather

#: ``python -m kernelscale ARGS`` with a fault at POINT: the process sends itself SIGNAL
#: there. SIGKILL runs no handler and no cleanup (a node failure, the OOM killer);
#: SIGTERM is what Slurm sends at the time limit. Each point is found by wrapping the one
#: call that marks it, so the run dies at exactly that place and not merely near it.
_INJECT = r"""
import os, runpy, signal, sys
from pathlib import Path

point, signum = sys.argv[1], getattr(signal, sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


if point == "complete":  # the kernel just marked complete, nothing evaluated yet
    from kernelscale.output import KernelOutput

    finish, calls = KernelOutput.finish_if_complete, []

    def finish_then_die(self):
        done = finish(self)
        calls.append(done)
        if len(calls) == 1:
            die()
        return done

    KernelOutput.finish_if_complete = finish_then_die
elif point in ("results", "curve", "publish"):
    replace = os.replace

    def replace_and_die(src, dst, **kw):
        name = Path(dst).name
        # results: written and fsynced, not yet renamed; publish: the new report complete
        # in its temp folder, the old one already moved aside
        if (point, name) in (("results", "results.json"), ("publish", "report")):
            die()
        replace(src, dst, **kw)
        if (point, name) == ("curve", "curve.json"):  # the curve's first point saved
            die()

    os.replace = replace_and_die
elif point == "report":  # half of the report's figures drawn
    from matplotlib.figure import Figure

    savefig, saved = Figure.savefig, []

    def savefig_then_die(self, *a, **kw):
        savefig(self, *a, **kw)
        saved.append(1)
        if len(saved) == 2:
            die()

    Figure.savefig = savefig_then_die
else:
    raise SystemExit(f"unknown point {point}")
runpy.run_module("kernelscale", run_name="__main__", alter_sys=True)
"""

GATHER_JOB = """
[job]
name = "gather-faults"
workdir = "{workdir}"
[ingest]
source = "{d}/src"
store = "{d}/store"
[kernel]
out = "kernel"
device = "cpu"
chunks = "8x32"
tile = "8x32"
[evaluate]
labels = "{d}/labels.npz"
json = "results.json"
[curve]
out = "curve"
runs = "4,all"
[report]
out = "report"
[slurm]
tasks = 2
"""

#: one BLAS thread: the curve's kernels of a resumed gather must equal those of an
#: uninterrupted one bit for bit
_ENV = {"OMP_NUM_THREADS": "1"}


def _gather_job(d, workdir):
    """A job whose kernel two array tasks computed, as a Slurm array leaves it: plan
    written, every tile done, not yet marked complete (the last task killed between its
    last done-marker and the mark; gather is what finishes that). No Slurm needed."""
    import dataclasses

    import zarr

    from kernelscale.atomic import atomic_write_json
    from kernelscale.config import load_job, slurm_settings
    from kernelscale.kernel import compute_kernel
    from kernelscale.slurm.geometry import plan_array
    from kernelscale.slurm.queue import SlurmPaths
    from tests.reference import labels_file

    random_source(d / "src", [7, 8, 9])
    ingest_dir(d / "src", d / "store", run_chunk=4, show_progress=False)
    labels_file(d / "labels.npz", 96, 40, 5)
    job = d / "job.toml"
    job.write_text(GATHER_JOB.format(d=d, workdir=workdir))
    cfg = load_job(job)
    t = slurm_settings(cfg)
    kp = plan_array(cfg, t, need_ingest=False)
    assert len(kp.regions) == 2
    atomic_write_json(SlurmPaths.of(cfg, t).plan, kp.as_json())
    kc = cfg.kernel_config(show_progress=False)
    for r in kp.regions:
        compute_kernel(dataclasses.replace(kc, rows=(r.r0, r.r1), cols=(r.c0, r.c1)))
    zarr.open_group(str(workdir / "kernel"), mode="r+").attrs["complete"] = False
    return job


def _normalised(path, workdir):
    """A JSON output with the workdir's own path and the fields that differ between two
    runs of the same command (the time, the kernels' seconds) taken out."""
    import json

    def drop(o):
        if isinstance(o, dict):
            return {k: drop(v) for k, v in o.items() if k not in ("created_at",
                                                                    "kernel_seconds")}
        if isinstance(o, list):
            return [drop(v) for v in o]
        return o

    return drop(json.loads(path.read_text().replace(str(workdir), "WORKDIR")))


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _kernel_files(workdir):
    """The kernel's bytes (its array's chunks and metadata, its done-markers) by path."""
    k = workdir / "kernel"
    return {str(p.relative_to(k)): p.read_bytes() for sub in ("kernel", ".done")
            for p in sorted((k / sub).rglob("*")) if p.is_file()}


def _page(workdir):
    """The report's page without the workdir's path and the minute it was made."""
    import re

    text = (workdir / "report/index.html").read_text().replace(str(workdir), "WORKDIR")
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "TIME", text)


def _assert_same_outputs(w, ref):
    """``w`` holds what an uninterrupted gather left in ``ref``: the same files, the
    same kernel bytes, the same results, curve and report."""
    import zarr

    assert _tree(w) == _tree(ref), "files left over or missing"
    assert _kernel_files(w) == _kernel_files(ref)
    assert zarr.open_group(str(w / "kernel"), mode="r").attrs.asdict() == \
        zarr.open_group(str(ref / "kernel"), mode="r").attrs.asdict()
    for name in ("results.json", "curve/curve.json", "report/report.json"):
        assert _normalised(w / name, w) == _normalised(ref / name, ref), name
    assert _page(w) == _page(ref)
    for png in sorted((ref / "report").glob("*.png")):
        assert (w / "report" / png.name).read_bytes() == png.read_bytes(), png.name


def _assert_nothing_torn(w):
    """Every output file that exists is whole: JSON parses, the page ends, PNGs end."""
    import json

    for p in [w / "results.json", w / "curve/curve.json", *w.glob("report/*.json")]:
        if p.exists():
            json.loads(p.read_text())
    if (w / "report").exists():
        assert (w / "report/index.html").read_text().rstrip().endswith("</html>")
        for png in (w / "report").glob("*.png"):
            assert png.read_bytes()[-8:] == b"IEND\xaeB`\x82", png


@pytest.fixture(scope="module")
def gather_case(tmp_path_factory):
    """(data folder, job file, pristine workdir, the workdir after an uninterrupted
    gather, that gather's stderr)."""
    import shutil

    d = tmp_path_factory.mktemp("gather")
    pristine = d / "pristine"
    job = _gather_job(d, pristine)
    ref = d / "ref"
    shutil.copytree(pristine, ref, symlinks=True)
    r = run_cli("gather", str(job), "--workdir", str(ref), env=_ENV)
    return d, job, pristine, ref, r.stderr


def _age_debris(w, seconds=3600):
    """Make the temp files a killed run left look ``seconds`` old: what the next run
    finds when Slurm requeues a job long after its node died."""
    old = time.time() - seconds
    for p in w.rglob(".*.tmp"):
        os.utime(p, (old, old))


def _gather_left(job, w) -> bool:
    """Is the gather still to do, for ``status`` and for ``submit`` (which would queue
    it again)? The two must agree."""
    out = run_cli("status", str(job), "--workdir", str(w)).stdout
    status = next(line.split(":")[1].strip() for line in out.splitlines()
                  if line.strip().startswith("gather:"))
    plan = run_cli("submit", str(job), "--workdir", str(w), "--dry-run").stdout
    queued = f"sbatch --parsable {w / 'slurm' / 'gather.sbatch'}" in plan
    assert status.startswith("left" if queued else "done"), (status, plan)
    return queued


#: where each kill leaves the workdir: results.json present, curve points, report
#: present, and what the killed run left behind for the next one to remove
_KILLED_STATE = {
    "complete": (False, 0, False, []),
    "results": (False, 0, False, [".results.json.*.tmp"]),
    "curve": (True, 1, False, ["curve/.kernel-runs-4.deleted"]),
    "report": (True, 2, False, [".report.*.tmp"]),
    "publish": (True, 2, False, [".report.*.tmp", ".report.old-*"]),
}


@pytest.mark.parametrize("point", list(_KILLED_STATE))
def test_gather_killed_then_rerun_equals_uninterrupted(gather_case, tmp_path, point):
    """kill -9 gather at a point of its evaluate, curve or report stage; ``status`` says
    the gather is left to do, and running it again gives what an uninterrupted gather
    gives: the kernel's bytes unchanged, the same results, curve and report, no file torn
    and nothing left behind. ``publish`` kills a gather re-run over a finished one (a
    requeue) between moving the old report aside and putting the new one in place."""
    import json
    import shutil

    import zarr

    d, job, pristine, ref, _ = gather_case
    w = tmp_path / "w"
    shutil.copytree(ref if point == "publish" else pristine, w, symlinks=True)
    kernel_before = _kernel_files(w)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **_ENV}
    p = subprocess.run([sys.executable, "-c", _INJECT, point, "SIGKILL", "-q", "gather",
                        str(job), "--workdir", str(w)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert zarr.open_group(str(w / "kernel"), mode="r").attrs["complete"] is True
    assert _kernel_files(w) == kernel_before
    results, points, report, debris = _KILLED_STATE[point]
    assert (w / "results.json").exists() == results
    for pattern in debris:
        assert list(w.glob(pattern)), f"no {pattern}: the kill missed its point"
    got = json.loads((w / "curve/curve.json").read_text())["points"] if points else []
    assert len(got) == points
    assert (w / "report").exists() == report
    _assert_nothing_torn(w)
    assert _gather_left(job, w)
    _age_debris(w)
    run_cli("gather", str(job), "--workdir", str(w), env=_ENV)
    _assert_nothing_torn(w)
    _assert_same_outputs(w, ref)
    assert not _gather_left(job, w)


def test_gather_stopped_by_sigterm_cleans_up_exits_75_then_resumes(gather_case, tmp_path):
    """Slurm's time limit (SIGTERM) half-way through the report: one line, exit 75 (the
    code a requeue wrapper looks for), the report's temp folder removed, what was
    finished kept; running gather again finishes the job as if never stopped."""
    import shutil

    d, job, pristine, ref, _ = gather_case
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **_ENV}
    p = subprocess.run([sys.executable, "-c", _INJECT, "report", "SIGTERM", "-q", "gather",
                        str(job), "--workdir", str(w)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 75, p.stderr
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if "SIGTERM" in x]
    assert len(errors) == 1 and "gather" in errors[0], p.stderr
    assert (w / "results.json").exists() and not (w / "report").exists()
    assert not list(w.glob(".report.*")), "the stopped report's temp folder is removed"
    _assert_nothing_torn(w)
    assert _gather_left(job, w)
    run_cli("gather", str(job), "--workdir", str(w), env=_ENV)
    _assert_same_outputs(w, ref)


@pytest.fixture
def gather_disk(tmp_path):
    yield from _tmpfs(tmp_path / "disk", "4m")


def _fill(disk, leave: int) -> None:
    """Fill ``disk`` but for ``leave`` bytes (a tmpfs counts whole pages)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    assert free > leave, f"the disk has {free} bytes free, fewer than {leave}"
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * (free - leave))
    left = os.statvfs(disk).f_bavail * st.f_frsize
    assert left <= leave, f"{left} bytes still free, meant {leave}"


def _pages(*paths, page=4096):
    return sum(-(-p.stat().st_size // page) for p in paths) * page


@pytest.mark.parametrize("where", ["results", "report"])
def test_disk_full_under_gather_is_one_line_and_the_same_command_finishes(
        gather_case, gather_disk, where):
    """A job's workdir on a full disk when gather evaluates (results.json) or draws the
    report: one error line naming the file, exit 74, no traceback, the kernel's bytes as
    they were, no partial file; with space again the same command finishes with what
    an uninterrupted gather gives."""
    import json
    import shutil

    d, job, pristine, ref, ref_err = gather_case
    w = gather_disk / "w"
    shutil.copytree(pristine, w, symlinks=True)
    kernel_before = _kernel_files(w)
    if where == "results":
        # one page: enough to mark the kernel complete (its zarr.json is rewritten via a
        # temp of one page), not for results.json
        leave = 4096
        assert _pages(ref / "results.json") > leave
    else:
        # results.json, curve.json and the curve's per-point kernel fit; the report's
        # figures do not
        room = 32 * 4096
        leave = _pages(ref / "results.json", ref / "curve/curve.json") + room
        assert _pages(*(ref / "report").iterdir()) > room
    _fill(gather_disk, leave)
    r = run_cli("gather", str(job), "--workdir", str(w), env=_ENV, check=False)
    assert r.returncode == 74, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("kernelscale: error:")]
    assert errors == lines[-1:], r.stderr  # one error line, last
    named = w / ("results.json" if where == "results" else "report")
    assert f"{named}: No space left on device" in errors[0], errors
    # before it: the progress lines of an uninterrupted gather, and nothing else
    before = [x.replace(str(w), "WORKDIR") for x in lines[:-1]]
    assert before == [x.replace(str(ref), "WORKDIR")
                      for x in ref_err.strip().splitlines()][:len(before)]
    assert _kernel_files(w) == kernel_before
    _assert_nothing_torn(w)
    assert not list(w.rglob(".*.tmp")), "a temp of the failed write is left"
    if where == "results":
        assert not (w / "results.json").exists() and not (w / "curve").exists()
    else:
        assert _normalised(w / "results.json", w) == _normalised(ref / "results.json", ref)
        assert len(json.loads((w / "curve/curve.json").read_text())["points"]) == 2
        assert not (w / "report").exists()
    (gather_disk / "filler").unlink()
    run_cli("gather", str(job), "--workdir", str(w), env=_ENV)
    _assert_same_outputs(w, ref)


@pytest.mark.fault
@pytest.mark.parametrize("when", ["before the copy", "during the copy"])
def test_a_file_rewritten_while_it_is_ingested_is_refused_and_nothing_stored(tmp_path, when):
    """A training job still writing a log.pt: the file changes after it was read and
    hashed. Its logits may be memory-mapped, so storing them would mix two versions
    under one sha256; the file is refused and the store keeps only the earlier files."""
    from kernelscale.errors import BadInputError
    from kernelscale.parallel import serial_preparer
    from kernelscale.store_chunks import SplitChunks
    from tests.reference import write_log

    src = tmp_path / "src"
    test, train = random_source(src, [6, 6], n_test=20, n_train=50, classes=4, seed=3)
    files = sorted(src.rglob("log.pt"))

    def rewrite(path):
        time.sleep(0.01)  # a later modification time on any file system clock
        write_log(path, test[6:] + 1, train[6:] + 1)

    def preparer(fetched, spec):
        for f, item in serial_preparer(fetched, spec):
            if when == "before the copy" and item.file.name.endswith(files[1].parent.name
                                                                     + "/log.pt"):
                rewrite(files[1])
            yield f, item

    original = SplitChunks.write_runs

    def write_runs(self, start, data):
        original(self, start, data)
        if when == "during the copy" and start > 0 and self.split == "train":
            rewrite(files[1])

    mp = pytest.MonkeyPatch()
    mp.setattr(SplitChunks, "write_runs", write_runs)
    try:
        with pytest.raises(BadInputError, match="changed while it was being ingested"):
            ingest_dir(src, tmp_path / "store", preparer=preparer, show_progress=False)
    finally:
        mp.undo()
    s = Store.open(tmp_path / "store")
    assert s.runs == 6 and [f["name"] for f in s.manifest["files"]] == [
        str(files[0].relative_to(src))]
    np.testing.assert_array_equal(s.read("train", 0, 6), train[:6])
    # the same command once the file is complete: it goes in, as it now is
    ingest_dir(src, tmp_path / "store", show_progress=False)
    s = Store.open(tmp_path / "store")
    assert s.runs == 12
    np.testing.assert_array_equal(s.read("train", 6, 12), (train[6:] + 1).astype(s.read(
        "train", 6, 12).dtype))
