"""`kernelscale submit/status/gather`: planning and scripts here, and on a real Slurm.

The tests marked ``slurm`` submit to the cluster that ``sbatch`` reaches (``.ci/run``
starts a local one); without one they are skipped, and under ``CI=true`` they fail.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kernelscale.atomic import atomic_write_json
from kernelscale.config import load_job, slurm_settings
from kernelscale.errors import ConfigError
from kernelscale.plan import Tile, group_regions, plan, split_tile
from kernelscale.slurm import gather, status, submit
from kernelscale.slurm.geometry import plan_array
from kernelscale.slurm.queue import SlurmError, SlurmPaths
from kernelscale.slurm.scripts import array_spec
from kernelscale.units import parse_pair, parse_slurm_time
from tests.conftest import ROOT, run_cli
from tests.reference import random_source, reference_kernel
from tests.test_ingestion import assert_same_store

# one worker runs this file: its jobs never race each other for the one-node cluster
pytestmark = pytest.mark.xdist_group("slurm")

DATA = ROOT / "tests" / "data" / "slurm"
REGENERATE = os.environ.get("KERNELSCALE_REGENERATE_SLURM") == "1"
#: one BLAS thread everywhere, so that the Slurm tasks and the single-process runs they are
#: compared with bitwise do the very same float operations
ENV = {"OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------- no Slurm needed

def test_slurm_time_formats():
    assert parse_slurm_time("10") == 600
    assert parse_slurm_time("10:30") == 630
    assert parse_slurm_time("04:00:00") == 4 * 3600
    assert parse_slurm_time("1-12") == 36 * 3600
    assert parse_slurm_time("2-03:04") == (51 * 60 + 4) * 60
    assert parse_slurm_time("1-00:00:05") == 86405
    assert parse_slurm_time("UNLIMITED") is None
    with pytest.raises(ConfigError, match="expected a Slurm time"):
        parse_slurm_time("4h")


def test_array_spec():
    assert array_spec([0, 1, 2, 5, 7, 8], 3) == "0-2,5,7-8%3"
    assert array_spec([4], None) == "4"


@pytest.mark.parametrize("shape,chunks,tile,tasks", [
    ((1000, 5000), (100, 1000), (300, 2000), 4),
    ((1000, 5000), (100, 1000), (100, 1000), 7),
    ((128, 512), (64, 128), (64, 128), 4),
    ((10000, 50000), (1024, 4096), (1024, 4096), 1000),
    ((10000, 50000), (1024, 4096), (1024, 4096), 1),
])
def test_regions_cover_every_cell_once(shape, chunks, tile, tasks):
    p = plan(shape, classes=10, budget=1 << 40, chunks=chunks, store_run_chunk=8, runs=100,
             tile=tile)
    regions = group_regions(list(p.tiles), tasks)
    assert 1 <= len(regions) <= tasks
    if tasks >= len(p.tiles):
        assert len(regions) == len(p.tiles)
    # every edge lies on the chunk grid, so counting per chunk counts every cell
    cr, cc = chunks
    count = np.zeros((-(-shape[0] // cr), -(-shape[1] // cc)), dtype=np.int32)
    for r in regions:
        assert r.r0 % cr == 0 and r.c0 % cc == 0
        assert r.r1 % cr == 0 or r.r1 == shape[0]
        assert r.c1 % cc == 0 or r.c1 == shape[1]
        count[r.r0 // cr:-(-r.r1 // cr), r.c0 // cc:-(-r.c1 // cc)] += 1
        # a region is whole tiles: every tile lies inside it or apart from it
        for t in p.tiles:
            inside = r.r0 <= t.r0 and t.r1 <= r.r1 and r.c0 <= t.c0 and t.c1 <= r.c1
            apart = t.r1 <= r.r0 or r.r1 <= t.r0 or t.c1 <= r.c0 or r.c1 <= t.c0
            assert inside or apart
    assert (count == 1).all()


def test_split_tile_gives_enough_tiles_on_the_chunk_grid():
    for tasks in (1, 2, 3, 5, 8, 13):
        tr, tc = split_tile(1000, 5000, (100, 500), (1000, 5000), tasks)
        assert tr % 100 == 0 and tc % 500 == 0
        n = -(-1000 // tr) * -(-5000 // tc)
        assert n >= tasks
        assert n <= 2 * tasks  # and not needlessly many


def _write_job(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


DRY_JOB = """
[job]
name = "demo-gpu"
workdir = "run"

[simulate]
out = "simulated"
runs = 400
files = 4
n_train = 5000
n_test = 1000

[ingest]
source = "simulated"
store = "store"

[kernel]
out = "kernel"
max_memory = "40G"
chunks = "500x1024"
checkpoint_every = 300

[evaluate]
labels = "simulated/labels.npz"

[slurm]
partition = "gpu"
account = "proj42"
time = "02:00:00"
mem = "32G"
cpus_per_task = 8
tasks = 3
max_parallel = 2
signal_lead = 180
max_requeues = 2
ingest_cpus = 16
ingest_mem = "64G"
extra = ["--qos=normal", "--constraint=a100"]
setup = "module load cuda/12.4"
command = "kernelscale"
"""


def test_dry_run_prints_the_saved_scripts(tmp_path):
    job = _write_job(tmp_path / "job.toml", DRY_JOB)
    p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "run"))
    text = p.stdout.replace(str(tmp_path), "/WORK")
    parts = re.split(r"^\n?==> (\S+) <==\n", text, flags=re.M)
    got = {"plan.txt": parts[0]}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        got[Path(name).name] = body
    assert sorted(got) == ["gather.sbatch", "ingest.sbatch", "kernel-array.sbatch", "plan.txt"]
    if REGENERATE:
        DATA.mkdir(parents=True, exist_ok=True)
        for name, body in got.items():
            (DATA / name).write_text(body)
    for name, body in got.items():
        assert body == (DATA / name).read_text(), f"{name} differs from tests/data/slurm/ " \
            "(KERNELSCALE_REGENERATE_SLURM=1 rewrites the copies after a deliberate change)"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    # the scripts are valid bash
    for name in ("ingest.sbatch", "kernel-array.sbatch", "gather.sbatch"):
        subprocess.run(["bash", "-n"], input=got[name], text=True, check=True)


def test_every_kernel_option_reaches_the_tasks(tmp_path):
    """An ablation job's options reach every kernel command; only the one command that
    creates the output may replace an old one (--overwrite in a task would delete the
    tiles of the others)."""
    body = DRY_JOB.replace('chunks = "500x1024"', 'chunks = "500x1024"\nlog_softmax = false\n'
                           'classes = [1, 3]\nruns_per_step = 6\noverwrite = true')
    job = _write_job(tmp_path / "job.toml", body)
    p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "run"))
    scripts = dict(re.findall(r"^==> \S+/(\S+) <==\n(.*?)(?=^==> |\Z)", p.stdout,
                              flags=re.M | re.S))
    create = next(x for x in scripts["ingest.sbatch"].splitlines() if "--create-only" in x)
    task = scripts["kernel-array.sbatch"]
    for text in (create, task):
        assert "--no-log-softmax" in text and "--class 1,3" in text
        assert "--runs-per-step 6" in text
    assert "--overwrite" in create and "--overwrite" not in task and "--restart" not in task


def test_remote_source_plans_from_declared_shape(tmp_path):
    """An hf:// store is not readable before its ingest: [ingest] shape lets submit plan."""
    body = """
[job]
name = "hub"
[ingest]
source = "hf://datasets/kjj0/cifar10-multirun-logits/logs_saveoutputs_main"
store = "store"
{shape}
[kernel]
out = "kernel"
chunks = "1024x4096"
[slurm]
tasks = 4
"""
    job = _write_job(tmp_path / "job.toml", body.format(shape=""))
    wd = ["--workdir", str(tmp_path / "run")]
    p = run_cli("submit", str(job), "--dry-run", *wd, check=False)
    assert p.returncode == 2 and "[ingest] shape" in p.stderr
    job = _write_job(tmp_path / "job.toml", body.format(shape='shape = "10000x50000x10"'))
    p = run_cli("submit", str(job), "--dry-run", *wd)
    assert "kernel: test-train 10000x50000 float32" in p.stdout
    assert "(shape from the [ingest] shape)" in p.stdout
    assert "--shape 10000x50000x10" in p.stdout  # the ingest job checks every file
    assert "#SBATCH --array=0-3" in p.stdout


def test_command_line_overrides_and_bad_settings(tmp_path):
    job = _write_job(tmp_path / "job.toml", DRY_JOB)
    wd = ["--workdir", str(tmp_path / "run")]
    p = run_cli("submit", str(job), "--dry-run", *wd, "--partition", "big", "--time", "30:00",
                "--gres", "", "--max-parallel", "5")
    assert "#SBATCH --partition=big" in p.stdout and "#SBATCH --time=30:00" in p.stdout
    assert "--gres" not in p.stdout and "#SBATCH --array=0-2%5" in p.stdout
    p = run_cli("submit", str(job), "--dry-run", *wd, "--signal-lead", "7200", check=False)
    assert p.returncode == 2 and "signal_lead 7200 s is not shorter" in p.stderr
    _write_job(tmp_path / "bad.toml", DRY_JOB + "gpus = 2\n")
    p = run_cli("submit", str(tmp_path / "bad.toml"), "--dry-run", *wd, check=False)
    assert p.returncode == 2
    assert re.search(r"kernelscale: error: .*bad.toml \[slurm\]: unknown key\(s\) gpus",
                     p.stderr)
    _write_job(tmp_path / "bad2.toml", DRY_JOB.replace('"--qos=normal"', '"qos=normal"'))
    p = run_cli("submit", str(tmp_path / "bad2.toml"), "--dry-run", *wd, check=False)
    assert p.returncode == 2 and "extra must list sbatch options" in p.stderr


# ------------------------------------------------------ stores shared by several tests

#: runs of a small problem: each region folds this many run-chunks of one run, which takes
#: the second or two the signal tests need to catch a task mid-way (after its first
#: checkpoint, before its last run; at 600 runs a task took 0.4 s)
SLOW_RUNS = 2400
SLOW_KERNEL = """
[kernel]
out = "kernel"
device = "cpu"
chunks = "64x256"
tile = "64x256"
runs_per_step = 1
checkpoint_every = 0.2
"""


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory):
    """(dir, store, single-process kernel, test logits, train logits)."""
    from tests.conftest import ingest_dir

    d = tmp_path_factory.mktemp("slow")
    test, train = random_source(d / "src", [300] * (SLOW_RUNS // 300), n_test=64,
                                n_train=512, classes=10, seed=5)
    ingest_dir(d / "src", d / "store", run_chunk=1, show_progress=False)
    K = _single_process(d / "store", d / "single", "64x256", "64x256", runs_per_step=1)
    return d, d / "store", K, test, train


def _single_process(store: Path, out: Path, chunks: str, tile: str, **kw) -> np.ndarray:
    """The kernel of one process with one BLAS thread, as the array tasks run."""
    from kernelscale.kernel import KernelConfig, compute_kernel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_kernel(KernelConfig(store=store, out=out, device="cpu", show_progress=False,
                                    chunks=parse_pair(chunks, "chunks"),
                                    tile=parse_pair(tile, "tile"), **kw))
    finally:
        torch.set_num_threads(threads)
    return zarr.open_group(str(out), mode="r")["kernel"][...]


def _slow_job(tmp_path: Path, d: Path, **slurm) -> Path:
    settings = {"gres": '""', "cpus_per_task": 1, "gather_cpus": 1, "tasks": 2,
                "time": '"10:00"', **{k: str(v) for k, v in slurm.items()}}
    body = (f'[job]\nname = "slow-{tmp_path.name[-12:]}"\nworkdir = "{tmp_path / "w"}"\n\n'
            f'[ingest]\nsource = "{d / "src"}"\nstore = "{d / "store"}"\n'
            + SLOW_KERNEL + "\n[slurm]\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return _write_job(tmp_path / "job.toml", body)


def _gather_job(tmp_path, store, name: str, *, tasks: int, kernel: str = ""):
    """A job whose kernel (8x32 tiles on the CPU) a test computes region by region."""
    return _write_job(tmp_path / "job.toml", f"""
[job]
name = "{name}"
workdir = "{tmp_path / "w"}"
[ingest]
source = "{tmp_path / "src"}"
store = "{store}"
[kernel]
out = "kernel"
device = "cpu"
chunks = "8x32"
tile = "8x32"
{kernel}
[slurm]
tasks = {tasks}
""")


def test_gather_checks_every_planned_tile(tmp_path, small_store):
    from kernelscale.kernel import compute_kernel

    store, test, train = small_store
    job = _gather_job(tmp_path, store, "gather", tasks=2)
    cfg = load_job(job)
    t = slurm_settings(cfg)
    kp = plan_array(cfg, t, need_ingest=False)
    assert len(kp.tiles) == 15
    assert [(r.r0, r.r1, r.c0, r.c1) for r in kp.regions] == [(0, 24, 0, 96), (24, 40, 0, 96)]
    atomic_write_json(SlurmPaths.of(cfg, t).plan, kp.as_json())
    kc = cfg.kernel_config(show_progress=False)
    r = kp.regions[0]
    s = compute_kernel(dataclasses.replace(kc, rows=(r.r0, r.r1), cols=(r.c0, r.c1)))
    assert s.tiles == 9 and not s.complete
    with pytest.raises(SlurmError, match=r"6 of 15 tiles have no done-marker \(regions 1\)"):
        gather(job)
    out = tmp_path / "w" / "kernel"
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    r = kp.regions[1]
    compute_kernel(dataclasses.replace(kc, rows=(r.r0, r.r1), cols=(r.c0, r.c1)))
    assert gather(job) == 0
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True
    assert np.abs(g["kernel"][...] - reference_kernel(test, train)).max() <= 1e-5


def test_gather_runs_evaluate_and_report_stages(tmp_path, small_store):
    """The gather job ends the job: evaluate, then [report] when the job file has one."""
    from html.parser import HTMLParser

    from kernelscale.kernel import compute_kernel
    from tests.reference import labels_file

    store, *_ = small_store
    labels_file(tmp_path / "labels.npz", 96, 40, 5)
    job = _write_job(tmp_path / "job.toml", f"""
[job]
name = "gather-report"
workdir = "{tmp_path / "w"}"
[ingest]
source = "{tmp_path / "src"}"
store = "{store}"
[kernel]
out = "kernel"
device = "cpu"
[evaluate]
labels = "{tmp_path / "labels.npz"}"
json = "results.json"
[report]
out = "report"
[slurm]
tasks = 1
""")
    cfg = load_job(job)
    t = slurm_settings(cfg)
    kp = plan_array(cfg, t, need_ingest=False)
    atomic_write_json(SlurmPaths.of(cfg, t).plan, kp.as_json())
    compute_kernel(dataclasses.replace(cfg.kernel_config(show_progress=False), chunks=kp.chunks,
                                       tile=kp.tile))
    assert gather(job) == 0
    assert (tmp_path / "w" / "results.json").is_file()
    index = tmp_path / "w" / "report" / "index.html"
    ids = []

    class Ids(HTMLParser):
        def handle_starttag(self, tag, attrs):
            ids.extend(v for k, v in attrs if k == "id")

    Ids().feed(index.read_text())
    assert {"provenance", "baselines", "knn"} <= set(ids)


# ------------------------------------------------------------------ on a real Slurm

def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start one with ../shared/slurm/start-local-slurm.sh)"
    # a controller that is down (or a missing slurm.conf) makes the clients retry for a
    # while: ten seconds of no answer is no cluster
    cmd = ["squeue", "-h", "-o", "%i"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    if p.returncode != 0:
        return f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Slurm cluster answers under CI=true: {problem}")
        pytest.skip(f"no Slurm cluster: {problem}")


def _queue(job_id: str) -> dict[str, tuple[str, str]]:
    """{"12" or "12_3": (state, reason)} for every task of job ``job_id``."""
    p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%r"],
                       capture_output=True, text=True, timeout=30)
    out = {}
    for line in p.stdout.splitlines():
        i, s, r = line.strip().split("|")
        out[i] = (s, r)
    return out


def _wait(what: str, cond, timeout: float = 180.0, interval: float = 0.1, show=None):
    """Poll ``cond`` until it is truthy; on timeout, the failure names what was awaited
    and what ``show()`` describes then (the queue, a log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    seen = f"; then: {show()}" if show else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _finished(job_id: str) -> dict | None:
    q = _queue(job_id)
    if q and all(s in FINAL or (s == "PENDING" and "DependencyNeverSatisfied" in r)
                 for s, r in q.values()):
        return q
    return None


def _submitted(cfg_dir: Path) -> dict:
    return json.loads((cfg_dir / "w" / "slurm" / "submitted.json").read_text())


def _has_checkpoint(out: Path, tile: Tile) -> bool:
    """Has the pass computing just ``tile`` saved a checkpoint (so it is folding runs)?

    A cheap test, as the tasks it waits for share the CPUs with it: the checkpoint's name
    is the first 16 hex digits of the sha256 of the pass's tile keys.
    """
    key = hashlib.sha256(tile.key.encode()).hexdigest()[:16]
    return (out / ".checkpoints" / f"pass-{key}.npz").exists()


@pytest.mark.slurm
def test_submitted_job_matches_the_single_process_run(slurm, tmp_path, capsys):
    """Simulate, dask ingest, a 4-task kernel array and gather/evaluate, all on Slurm."""
    job = _write_job(tmp_path / "job.toml", f"""
[job]
name = "e2e-{tmp_path.name[-12:]}"
workdir = "{tmp_path / "w"}"

[simulate]
out = "simulated"
runs = 40
files = 4
n_train = 512
n_test = 128
seed = 3

[ingest]
source = "simulated"
store = "store"

[kernel]
out = "kernel"
device = "cpu"
chunks = "64x128"
tile = "64x128"

[evaluate]
labels = "simulated/labels.npz"

[slurm]
gres = ""
cpus_per_task = 1
ingest_cpus = 2
gather_cpus = 1
tasks = 4
time = "10:00"
""")
    p = run_cli("submit", str(job), env=ENV)
    assert "8 tile(s) in 4 region(s), 0 done, 4 to submit" in p.stdout
    jobs = _submitted(tmp_path)["submissions"][0]["jobs"]
    assert sorted(jobs) == ["gather", "ingest", "kernel"]
    # the gather job waits in the queue until the end: a second submit now is refused
    with pytest.raises(SlurmError, match="earlier submission still queued or running"):
        submit(job)
    q = _wait("the gather job", lambda: _finished(jobs["gather"]["id"]))
    w = tmp_path / "w"
    assert q[jobs["gather"]["id"]][0] == "COMPLETED", (w / "slurm").iterdir()
    assert {s for s, _ in _queue(jobs["kernel"]["id"]).values()} == {"COMPLETED"}

    # the dask-ingested store is the serial ingest's
    from tests.conftest import ingest_dir

    ingest_dir(w / "simulated", tmp_path / "serial", show_progress=False)
    assert_same_store(tmp_path / "serial", w / "store")
    # the kernel is the single-process run's, bit for bit, and close to the float64 truth
    single = _single_process(w / "store", tmp_path / "single", "64x128", "64x128")
    g = zarr.open_group(str(w / "kernel"), mode="r")
    assert g.attrs["complete"] is True
    K = g["kernel"][...]
    np.testing.assert_array_equal(K, single)
    objs = [torch.load(f, weights_only=True)
            for f in sorted((w / "simulated").glob("**/log.pt"))]
    te = torch.cat([o["logits"] for o in objs]).numpy()
    tr = torch.cat([o["logits_train"] for o in objs]).numpy()
    assert np.abs(K - reference_kernel(te, tr)).max() <= 1e-5
    res = json.loads((w / "results.json").read_text())
    assert res["runs"] == 40

    assert status(job) == 0
    st = capsys.readouterr().out
    assert "ingest: done: 4/4 file(s) in the store, 40 runs" in st
    assert "kernel: done 4/4 regions (8/8 tiles); running 0; pending 0; failed 0; left 0" in st
    assert "gather: done" in st
    # everything is done: a second submit has nothing to do
    assert submit(job) == 0
    assert "sbatch: nothing to submit" in capsys.readouterr().out
    assert len(_submitted(tmp_path)["submissions"]) == 1


@pytest.mark.slurm
def test_cancelled_task_is_all_that_a_resubmission_computes(slurm, slow_store, tmp_path,
                                                            capsys):
    d, _, K, test, train = slow_store
    job = _slow_job(tmp_path, d)
    run_cli("submit", str(job), env=ENV)
    jobs = _submitted(tmp_path)["submissions"][0]["jobs"]
    assert "ingest" not in jobs  # the store already holds every source file
    arr = jobs["kernel"]["id"]
    out = tmp_path / "w" / "kernel"
    _wait("task 1's first checkpoint", lambda: _has_checkpoint(out, Tile(0, 64, 256, 512)),
          interval=0.02)
    subprocess.run(["scancel", f"{arr}_1"], check=True)
    q = _wait("the array and gather to end", lambda: _finished(jobs["gather"]["id"])
              and _finished(arr))
    assert _queue(arr)[f"{arr}_1"][0] == "CANCELLED"
    assert _queue(arr)[f"{arr}_0"][0] == "COMPLETED"
    assert q  # the gather job was cancelled or can never run
    log1 = tmp_path / "w" / "slurm" / f"kernel-{arr}_1.out"
    assert status(job) == 0
    st = capsys.readouterr().out
    assert "kernel: done 1/2 regions (1/2 tiles)" in st and "failed 1" in st
    assert f"failed: task 1 ({arr}_1 CANCELLED, log {log1})" in st
    assert list((out / ".checkpoints").glob("*.npz")), "the cancelled task saved its state"

    marker0 = out / ".done" / f"{Tile(0, 64, 0, 256).key}.json"
    before = marker0.stat().st_mtime_ns
    p = run_cli("submit", str(job), env=ENV)
    assert "1 done, 1 to submit" in p.stdout and "task 1: rows 0:64 cols 256:512" in p.stdout
    jobs2 = _submitted(tmp_path)["submissions"][1]["jobs"]
    assert jobs2["kernel"]["indices"] == [1]
    q = _wait("the second gather", lambda: _finished(jobs2["gather"]["id"]))
    assert q[jobs2["gather"]["id"]][0] == "COMPLETED"
    assert set(_queue(jobs2["kernel"]["id"])) == {f"{jobs2['kernel']['id']}_1"}
    assert marker0.stat().st_mtime_ns == before, "region 0 was not computed again"
    log = (tmp_path / "w" / "slurm" / f"kernel-{jobs2['kernel']['id']}_1.out").read_text()
    assert re.search(rf"resuming 1 tile\(s\) from \d+/{SLOW_RUNS} runs", log)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True
    np.testing.assert_array_equal(g["kernel"][...], K)
    assert np.abs(K - reference_kernel(test, train)).max() <= 1e-5


@pytest.mark.slurm
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, slow_store, tmp_path):
    d, _, K, *_ = slow_store
    job = _slow_job(tmp_path, d, max_requeues=2)
    run_cli("submit", str(job), env=ENV)
    jobs = _submitted(tmp_path)["submissions"][0]["jobs"]
    arr = jobs["kernel"]["id"]
    out = tmp_path / "w" / "kernel"
    _wait("task 1's first checkpoint", lambda: _has_checkpoint(out, Tile(0, 64, 256, 512)),
          interval=0.02)
    # what Slurm does --signal-lead seconds before the time limit (--signal=B:USR1@...)
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{arr}_1"], check=True)
    # Slurm holds a requeued job until its old credential expires (about 2 minutes). Start
    # it sooner, but not within the second its old credential was revoked: slurmd refuses
    # a credential no newer than the revocation (whole seconds), and the job would fail.
    log = tmp_path / "w" / "slurm" / f"kernel-{arr}_1.out"
    _wait("task 1 to be requeued",
          lambda: _queue(arr).get(f"{arr}_1", ("", ""))[0] == "PENDING",
          show=lambda: f"queue {_queue(arr)}, log "
                       f"{log.read_text()[-2000:] if log.exists() else '(none)'}")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={arr}_1", "StartTime=now"], check=True)
    q = _wait("the gather job", lambda: _finished(jobs["gather"]["id"]))
    assert q[jobs["gather"]["id"]][0] == "COMPLETED"
    log = log.read_text()
    assert re.search(rf"kernelscale-task: {arr}_1 exit 75 .*\n(.*\n)*kernelscale-task: "
                     rf"{arr}_1 requeued", log), log
    assert re.search(rf"stopped by signal 10 after (\d+)/{SLOW_RUNS} runs", log), log
    assert "restart 1 rows 0:64 cols 256:512" in log
    assert re.search(rf"resuming 1 tile\(s\) from \d+/{SLOW_RUNS} runs", log), log
    assert re.search(rf"kernelscale-task: {arr}_1 exit 0", log)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True
    np.testing.assert_array_equal(g["kernel"][...], K)


def test_gather_merges_the_partial_topks_of_every_region(tmp_path, small_store):
    """A top-K job: each array task keeps its tiles' partial top-Ks; gather merges them
    into the same values and indices as one process computing the whole top-K kernel."""
    from kernelscale.kernel import KernelConfig, compute_kernel

    store, *_ = small_store
    job = _gather_job(tmp_path, store, "gather-topk", tasks=3, kernel="topk = 6")
    cfg = load_job(job)
    t = slurm_settings(cfg)
    kp = plan_array(cfg, t, need_ingest=False)
    atomic_write_json(SlurmPaths.of(cfg, t).plan, kp.as_json())
    kc = cfg.kernel_config(show_progress=False)
    assert kc.topk == 6
    for r in reversed(kp.regions):
        compute_kernel(dataclasses.replace(kc, rows=(r.r0, r.r1), cols=(r.c0, r.c1)))
    assert gather(job, evaluate=False) == 0
    compute_kernel(KernelConfig(store=store, out=tmp_path / "one", topk=6, chunks=(8, 32),
                                tile=(8, 32), device="cpu", show_progress=False))
    a = zarr.open_group(str(tmp_path / "w" / "kernel"), mode="r")
    b = zarr.open_group(str(tmp_path / "one"), mode="r")
    assert a.attrs["complete"] is True
    for name in ("values", "indices"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "dry"))
    assert "--topk 6" in p.stdout


def test_ingest_format_keys_and_labels_reach_the_ingest_job(tmp_path):
    body = DRY_JOB.replace('store = "store"\n', 'store = "store"\nformat = "safetensors"\n'
                           'keys = "scores,scores_train"\nlabels = "simulated/labels.npz"\n'
                           'labels_replace = true\n')
    job = _write_job(tmp_path / "job.toml", body)
    p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "run"))
    line = next(x for x in p.stdout.splitlines() if x.strip().startswith("kernelscale ingest"))
    assert "--format safetensors" in line and "--keys scores,scores_train" in line
    assert f"--labels {tmp_path / 'run' / 'simulated' / 'labels.npz'}" in line
    assert "--labels-replace" in line
    p = run_cli("submit", str(_write_job(tmp_path / "plain.toml", DRY_JOB)), "--dry-run",
                "--workdir", str(tmp_path / "run2"))
    assert "--format" not in p.stdout and "--keys" not in p.stdout


# ------------------------------------------- work done outside Slurm, --set, times

def _outside_job(tmp_path, store, source: str) -> Path:
    return _write_job(tmp_path / "job.toml", f"""
[job]
name = "outside"
workdir = "{tmp_path / "w"}"
[ingest]
source = "{source}"
store = "{store}"
shape = "40x96x5"
[kernel]
out = "kernel"
device = "cpu"
chunks = "8x32"
[slurm]
gres = ""
tasks = 3
""")


@pytest.mark.parametrize("source", ["local", "hub"])
def test_a_kernel_finished_by_run_is_done_for_status_and_submit(tmp_path, small_store,
                                                                 capsys, source):
    """`kernelscale run` computed the job's kernel: status shows it done and submit has
    nothing to compute. With an hf:// source (listed only by an ingest) the ingest counts
    as done once the job's kernel of the store is finished. A finished kernel of other
    options (another run count) is not the job's."""
    store, *_ = small_store
    src = str(tmp_path / "src") if source == "local" else "hf://datasets/o/n/logs"
    job = _outside_job(tmp_path, store, src)
    assert status(job) == 0
    before = capsys.readouterr().out
    assert "kernel: not submitted yet (no plan)" in before
    assert ("ingest: left" if source == "hub" else "ingest: done") in before
    run_cli("run", str(job), "--only", "kernel")
    kernel = tmp_path / "w" / "kernel"
    assert status(job) == 0
    st = capsys.readouterr().out
    assert "ingest: done: 3/" in st
    assert f"kernel: done: {kernel} is finished (computed outside Slurm" in st
    assert "gather: done" in st
    assert submit(job, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "sbatch: nothing to submit" in out and "3 done, 0 to submit" in out
    assert "ingest: done" in out
    # the same job with another run count: that finished kernel is not its kernel
    assert status(job, sets=["kernel.runs=10"]) == 0
    st = capsys.readouterr().out
    assert "kernel: not submitted yet (no plan)" in st
    assert submit(job, dry_run=True, sets=["kernel.runs=10"]) == 0
    assert "sbatch: nothing to submit" not in capsys.readouterr().out


def test_a_top_k_kernel_finished_by_run_is_done_and_keeps_its_chunks(tmp_path, small_store,
                                                                     capsys):
    """A top-K kernel has no `kernel` array: it is found all the same, and the plan takes
    its chunk grid (the job names none), so that a real submit finds it the job's kernel
    and, everything being done, submits nothing (no Slurm needed)."""
    store, *_ = small_store
    job = _outside_job(tmp_path, store, str(tmp_path / "src"))
    job.write_text(job.read_text().replace('chunks = "8x32"', "topk = 4"))
    run_cli("run", str(job), "--only", "kernel", "--set", "kernel.chunks=16x64")
    assert submit(job) == 0
    out = capsys.readouterr().out
    assert "chunks 16x64" in out and "sbatch: nothing to submit" in out
    assert not (tmp_path / "w" / "slurm").exists()


def test_slurm_time_applies_to_every_job_unless_its_own_is_set(tmp_path):
    job = _write_job(tmp_path / "job.toml", DRY_JOB.replace('time = "02:00:00"',
                                                            'time = "30:00"'))

    def times(*args):
        p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "run"),
                    *args)
        scripts = dict(re.findall(r"^==> \S+/(\S+) <==\n(.*?)(?=^==> |\Z)", p.stdout,
                                  flags=re.M | re.S))
        return {name: re.search(r"^#SBATCH --time=(\S+)$", body, re.M).group(1)
                for name, body in scripts.items()}

    assert times() == {"ingest.sbatch": "30:00", "kernel-array.sbatch": "30:00",
                       "gather.sbatch": "30:00"}
    assert times("--time", "45:00") == {"ingest.sbatch": "45:00",
                                        "kernel-array.sbatch": "45:00",
                                        "gather.sbatch": "45:00"}
    assert times("--set", "slurm.gather_time=5:00", "--set", "slurm.ingest_time=1-00") == {
        "ingest.sbatch": "1-00", "kernel-array.sbatch": "30:00", "gather.sbatch": "5:00"}


def test_submit_set_reaches_every_script_and_the_gather_job(tmp_path, small_store, capsys):
    """--set changes what the kernel tasks compute, and the gather job loads the job file
    with the same --set (else it would check and evaluate another kernel)."""
    import shlex

    from kernelscale.cli import build_parser

    job = _write_job(tmp_path / "job.toml", DRY_JOB)
    sets = ["kernel.topk=7", "slurm.time=20:00", "job.name=config b",
            "evaluate.json=b results.json"]
    p = run_cli("submit", str(job), "--dry-run", "--workdir", str(tmp_path / "run"),
                *[x for s in sets for x in ("--set", s)])
    scripts = dict(re.findall(r"^==> \S+/(\S+) <==\n(.*?)(?=^==> |\Z)", p.stdout,
                              flags=re.M | re.S))
    assert "--topk 7" in scripts["kernel-array.sbatch"]
    assert "--topk 7" in scripts["ingest.sbatch"]  # the output it creates is top-K
    assert "#SBATCH --time=20:00" in scripts["kernel-array.sbatch"]
    assert "#SBATCH --job-name=config_b-gather" in scripts["gather.sbatch"]
    line = next(x for x in scripts["gather.sbatch"].splitlines() if " gather " in x)
    argv = shlex.split(line.split(" gather ", 1)[1])
    a = build_parser().parse_args(["gather", *argv])
    assert a.set == sets and a.workdir == str(tmp_path / "run")
    cfg = load_job(a.job, a.workdir, a.set)
    assert cfg.kernel.topk == 7 and cfg.evaluate.json == "b results.json"
    # status finds the records of that submission only with the same --set
    assert (SlurmPaths.of(cfg, slurm_settings(cfg)).folder ==
            (tmp_path / "run" / "slurm").resolve())


@pytest.mark.slurm
def test_kernel_by_run_then_submit_with_set_runs_only_the_gather(slurm, small_store, tmp_path,
                                                                 capsys):
    """A top-K kernel computed by `run` with --set: `submit` with the same --set submits
    only the gather job, which loads the job with those --set (else it would find no
    kernel of its options) and writes the results where the --set says."""
    from kernelscale.kernelread import load_kernel
    from tests.reference import labels_file

    store, *_ = small_store
    labels_file(tmp_path / "labels.npz", 96, 40, 5)
    job = _outside_job(tmp_path, store, str(tmp_path / "src"))
    job.write_text(job.read_text().replace("[slurm]", f'''[evaluate]
labels = "{tmp_path / "labels.npz"}"
[slurm]
cpus_per_task = 1
gather_cpus = 1
time = "10:00"'''))
    sets = ["kernel.topk=5", "evaluate.json=top5.json", f"job.name=top5-{tmp_path.name[-8:]}"]
    set_args = [x for s in sets for x in ("--set", s)]
    run_cli("run", str(job), "--only", "kernel", *set_args)
    assert submit(job, sets=sets) == 0
    out = capsys.readouterr().out
    assert "3 done, 0 to submit" in out
    jobs = _submitted(tmp_path)["submissions"][0]["jobs"]
    assert sorted(jobs) == ["gather"]
    q = _wait("the gather job", lambda: _finished(jobs["gather"]["id"]))
    assert q[jobs["gather"]["id"]][0] == "COMPLETED", (tmp_path / "w" / "slurm").iterdir()
    res = json.loads((tmp_path / "w" / "top5.json").read_text())
    assert res["runs"] == 24 and load_kernel(tmp_path / "w" / "kernel").topk == 5
    assert status(job, sets=sets) == 0
    assert "gather: done" in capsys.readouterr().out
    assert submit(job, sets=sets) == 0
    assert "sbatch: nothing to submit" in capsys.readouterr().out
