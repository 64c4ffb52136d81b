"""Job tables: values parsed on load, and the flags a table renders (for the sbatch
scripts) read back by the real command line into the same table."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.cli import build_parser
from kernelscale.cli_commands import _kernel_table
from kernelscale.config import KernelTable, load_job
from kernelscale.errors import ConfigError
from kernelscale.jobfields import table_flags

pairs = st.tuples(st.integers(1, 4096), st.integers(1, 4096))
ranges = st.tuples(st.integers(0, 100), st.integers(1, 100)).map(lambda t: (t[0], t[0] + t[1]))
kernel_tables = st.builds(
    KernelTable,
    out=st.just("k"), store=st.just("s"),
    runs=st.none() | st.integers(2, 10**5),
    pairs=st.sampled_from(["test-train", "train-train", "test-test"]),
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
    precision=st.sampled_from(["fp32", "tf32"]),
    max_memory=st.none() | st.integers(1, 10**12),
    checkpoint_every=st.sampled_from([600.0, 0.5, 30.0, 3600.0]),
    tile=st.none() | pairs, chunks=st.none() | pairs,
    rows=st.none() | ranges, cols=st.none() | ranges,
    runs_per_step=st.none() | st.integers(1, 512),
    log_softmax=st.booleans(), log_softmax_fp32=st.booleans(),
    classes=st.none() | st.lists(st.integers(0, 99), min_size=1, max_size=4).map(tuple),
    overwrite=st.booleans(), restart=st.booleans())


@settings(max_examples=200, deadline=None)
@given(kernel_tables)
def test_rendered_kernel_flags_read_back_as_the_same_table(table):
    argv = ["kernel", "--store", table.store, "--out", table.out]
    for flag, value in table_flags(table, skip=("store", "out")):
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    back = _kernel_table(build_parser().parse_args(argv))
    assert back == table


def test_text_values_are_parsed_when_the_job_is_loaded(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[kernel]\nmax_memory = "40G"\ntile = "1024x4096"\nclasses = "1,3"\n'
                   '[ingest]\nshape = "10000x50000x10"\n[curve]\nruns = "10,all"\n'
                   '[slurm]\ntime = "1-12"\n')
    cfg = load_job(job)
    assert cfg.kernel.max_memory == 40 * 10**9 and cfg.kernel.tile == (1024, 4096)
    assert cfg.kernel.classes == (1, 3) and cfg.ingest.shape == (10000, 50000, 10)
    assert cfg.curve.runs == (10, "all")
    kc = cfg.kernel_config()
    assert kc.max_memory == 40 * 10**9 and kc.classes == (1, 3)
    assert dataclasses.replace(kc, tile=None).tile is None


@pytest.mark.parametrize("table, line, message", [
    ("kernel", 'max_memory = "lots"', r"\[kernel\] max_memory 'lots': cannot read it as a size"),
    ("kernel", 'tile = "12"', r"\[kernel\] tile '12': expected ROWSxCOLS"),
    ("ingest", 'shape = "10x10"', r"\[ingest\] shape '10x10': expected N_TESTxN_TRAINxCLASSES"),
    ("slurm", 'time = "4h"', r"\[slurm\] time '4h': expected a Slurm time"),
    ("curve", 'runs = "1,all"', "1 runs; a kernel needs at least 2"),
    ("kernel", "runs = \"3\"", r"\[kernel\] runs must be int, got str '3'"),
])
def test_bad_text_values_fail_on_load_naming_file_table_and_key(tmp_path, table, line,
                                                                 message):
    job = tmp_path / "job.toml"
    job.write_text(f"[{table}]\n{line}\n[evaluate]\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_job(job)
    assert str(e.value).startswith(str(job))


# ------------------------------------------------------------- --set TABLE.FIELD=VALUE

BASE = """
[job]
workdir = "w"
[simulate]
[ingest]
[kernel]
[evaluate]
[curve]
[report]
[slurm]
"""


def _job_with(tmp_path, table: str, line: str):
    """The base job with ``line`` written into ``[table]`` (the job file's own value)."""
    job = tmp_path / f"with-{table}.toml"
    job.write_text(BASE.replace(f"[{table}]\n", f"[{table}]\n{line}\n", 1))
    return load_job(job)


@pytest.mark.parametrize("item, toml_line, expected", [
    ("job.name=2024", 'name = "2024"', "2024"),
    ("job.description=a \"b\" c", 'description = "a \\"b\\" c"', 'a "b" c'),
    ("simulate.runs=40", "runs = 40", 40),
    ("simulate.seed=7", "seed = 7", 7),
    ("ingest.source=hf://datasets/o/n/logs_b", 'source = "hf://datasets/o/n/logs_b"',
     "hf://datasets/o/n/logs_b"),
    ("ingest.shape=10x20x3", 'shape = "10x20x3"', (10, 20, 3)),
    ("ingest.keys=a,b", 'keys = ["a", "b"]', ("a", "b")),
    ("ingest.skip_bad=true", "skip_bad = true", True),
    ("ingest.revision=1234", 'revision = "1234"', "1234"),
    ("kernel.max_memory=40G", 'max_memory = "40G"', 40 * 10**9),
    ("kernel.topk=100", "topk = 100", 100),
    ("kernel.tile=64x128", 'tile = "64x128"', (64, 128)),
    ("kernel.classes=1,3", "classes = [1, 3]", (1, 3)),
    ("kernel.checkpoint_every=30", "checkpoint_every = 30.0", 30.0),
    ("kernel.log_softmax=false", "log_softmax = false", False),
    ("kernel.device=cuda:1", 'device = "cuda:1"', "cuda:1"),
    ("evaluate.weighting=power", 'weighting = "power"', "power"),
    ("evaluate.power=4", "power = 4.0", 4.0),
    ("evaluate.select=true", "select = true", True),
    ("evaluate.read_threads=2", "read_threads = 2", 2),
    ("curve.runs=10,20,all", 'runs = [10, 20, "all"]', (10, 20, "all")),
    ('curve.runs=[10, "all"]', 'runs = "10,all"', (10, "all")),
    ("report.threshold=0.7", "threshold = 0.7", 0.7),
    ("report.images=cifar10:data/c", 'images = "cifar10:data/c"', "cifar10:data/c"),
    ("slurm.time=30:00", 'time = "30:00"', "30:00"),
    ('slurm.extra=["--qos=high"]', 'extra = ["--qos=high"]', ["--qos=high"]),
    ("slurm.tasks=4", "tasks = 4", 4),
])
def test_set_values_are_read_like_the_job_files_own(tmp_path, item, toml_line, expected):
    table, field = item.partition("=")[0].split(".")
    job = tmp_path / "base.toml"
    job.write_text(BASE)
    by_set = load_job(job, sets=[item])
    by_file = _job_with(tmp_path, table, toml_line)
    assert getattr(getattr(by_set, table), field) == expected
    assert getattr(by_set, table) == getattr(by_file, table)
    assert by_set.sets == (item,)


def test_set_reaches_the_stage_configs(tmp_path):
    job = tmp_path / "base.toml"
    job.write_text(BASE)
    cfg = load_job(job, sets=["kernel.topk=50", "kernel.max_memory=2GiB",
                              "ingest.source=hf://datasets/o/n/logs_b",
                              "job.workdir=" + str(tmp_path / "elsewhere"),
                              "evaluate.train_kernel=tk", "evaluate.read_threads=3",
                              "evaluate.device=cpu", "curve.runs=5,all"])
    kc = cfg.kernel_config(show_progress=False)
    assert (kc.topk, kc.max_memory) == (50, 2 * 2**30)
    assert kc.out == tmp_path / "elsewhere" / "kernel"
    assert cfg.ingest_config(show_progress=False).source == "hf://datasets/o/n/logs_b"
    opts = cfg.evaluate_options()
    assert opts["train_kernel"] == str(tmp_path / "elsewhere" / "tk")
    assert (opts["workers"], opts["device"]) == (3, "cpu")
    assert cfg.evaluate_options(device="cuda")["device"] == "cuda"  # run --device wins
    assert cfg.curve_config(show_progress=False).runs == (5, "all")
    # later sets win; a table the job lacks is added, as writing it into the file would
    only = tmp_path / "only-kernel.toml"
    only.write_text('[kernel]\nout = "k"\n')
    cfg = load_job(only, sets=["kernel.topk=5", "kernel.topk=6", "evaluate.k=1"])
    assert cfg.kernel.topk == 6 and cfg.evaluate.k == 1 and cfg.curve is None


@pytest.mark.parametrize("item, message", [
    ("kernel.topk", r"^--set kernel\.topk: expected TABLE\.FIELD=VALUE"),
    ("topk=5", r"^--set topk=5: expected TABLE\.FIELD=VALUE"),
    ("kernal.topk=5", r"^--set kernal\.topk=5: no table 'kernal' \(tables: job, "),
    ("kernel.topkk=5", r"^--set kernel\.topkk=5: \[kernel\] has no field 'topkk'"),
    ("job.name=", None),  # an empty name is text, as name = "" is
    ("simulate.runs=many", r"^--set simulate\.runs must be int, got str 'many'"),
    ("simulate.classes=", r"^--set simulate\.classes must be int, got str ''"),
    ("ingest.shape=10x10", r"^--set ingest\.shape '10x10': expected N_TESTxN_TRAINxCLASSES"),
    ("ingest.format=hdf5", r"^--set ingest\.format 'hdf5': expected one of auto"),
    ("ingest.skip_bad=yes", r"^--set ingest\.skip_bad must be bool, got str 'yes'"),
    ("kernel.max_memory=lots", r"^--set kernel\.max_memory 'lots': cannot read it as a size"),
    ("kernel.topk=1.5", r"^--set kernel\.topk must be int, got float 1\.5"),
    ("kernel.tile=12", r"^--set kernel\.tile '12': expected ROWSxCOLS"),
    ("evaluate.weighting=cubic",
     r"^--set evaluate\.weighting 'cubic': expected one of none, power, softmax"),
    ("evaluate.select=1", r"^--set evaluate\.select must be bool, got int 1"),
    ("curve.runs=1,all", r"^--set curve\.runs: 1 runs; a kernel needs at least 2"),
    ("curve.runs=ten", r"^--set curve\.runs: 'ten' is not a number of runs"),
    ("report.threshold=high", r"^--set report\.threshold must be float, got str 'high'"),
    ("report.weighting=x", r"^--set report\.weighting 'x': expected one of"),
    ("slurm.time=4h", r"^--set slurm\.time '4h': expected a Slurm time"),
    ("slurm.extra=--qos=high", r"^--set slurm\.extra must be list, got str"),
    ("slurm.signal_lead=99999",
     r"\[slurm\] with --set slurm\.signal_lead: signal_lead must be 1\.\.65535"),
])
def test_bad_set_values_fail_on_load_naming_the_set(tmp_path, item, message):
    job = tmp_path / "base.toml"
    job.write_text(BASE)
    if message is None:
        assert load_job(job, sets=[item]).job.name == ""
        return
    with pytest.raises(ConfigError, match=message):
        load_job(job, sets=[item])


def test_job_values_other_than_the_set_ones_keep_naming_the_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[kernel]\nmax_memory = "lots"\n')
    with pytest.raises(ConfigError, match=r"job\.toml \[kernel\] max_memory 'lots'"):
        load_job(job, sets=["kernel.topk=5"])
    # the set value replaces the file's bad one before it is read
    assert load_job(job, sets=["kernel.max_memory=1G"]).kernel.max_memory == 10**9


# ----------------------------------------------------------------- a job as TOML

FULL = """
[job]
name = "all \\"tables\\" \\\\ \\u00e9\\u0001"
workdir = "w"
description = "every table, none at its defaults"

[simulate]
out = "sim"
runs = 30
files = 3
n_train = 100
n_test = 40
classes = 4
seed = 9

[ingest]
source = "hf://datasets/o/n/logs_b"
store = "st"
glob = "**/*.npz"
format = "npy"
keys = "a,b"
skip_bad = true
max_files = 3
max_runs = 99
run_chunk = 7
shape = "40x100x4"
workers = 2
scheduler = "tcp://h:8786"
converters = 1
device = "cpu"
revision = "v1"
download_workers = 2
retries = 1
keep_downloads = true
cache_dir = "cache"
labels = "lab.npz"
labels_replace = true

[kernel]
out = "kern"
store = "other-store"
runs = 20
pairs = "train-train"
device = "cuda:1"
precision = "tf32"
max_memory = "3GiB"
checkpoint_every = 1e-3
tile = "64x128"
chunks = "32x64"
rows = "0:32"
cols = "64:128"
runs_per_step = 5
topk = 10
log_softmax = false
log_softmax_fp32 = true
classes = "0,2"
overwrite = true
restart = true

[evaluate]
labels = "cifar10:data/c"
k = 5
weighting = "softmax"
power = 2.5
temperature = 0.05
select = true
seed = 3
train_kernel = "tk"
ablations = "abl"
json = "r.json"
per_run = true
device = "cpu"
read_threads = 1

[curve]
labels = "lab.npz"
runs = "5,10,all"
out = "cv"
k = 1
keep_kernels = true
seed = 2
topk = 4

[compare]
kernels = ["../other/kern", "hf://datasets/o/n@v2/cfg-a/kernel"]
labels = "lab.npz"
k = 7
sample = 20
seed = 5
out = "cmp"
read_threads = 2

[report]
out = "rep"
labels = "lab.npz"
train_kernel = "tk"
ablations = "abl"
images = "cifar10:data/c"
k = 5
weighting = "power"
power = 16.0
temperature = 0.1
threshold = 0.25
examples = 3
seed = 4

[publish]
repo = "hf://datasets/o/out/cfg-b"
what = "kernel,report"
revision = "cfg-b"
private = true
create = false
message = "cfg-b"
license = "cc-by-4.0"

[slurm]
partition = "gpu"
account = "acct"
time = "1-00:00:00"
mem = "64G"
gres = ""
cpus_per_task = 2
tasks = 9
max_parallel = 3
signal_lead = 60
max_requeues = 0
ingest_time = "10:00"
ingest_mem = "8G"
ingest_cpus = 4
gather_time = "5:00"
gather_mem = "4G"
gather_cpus = 1
gather_gres = "gpu:1"
extra = ["--qos=high", "--comment=\\"x y\\""]
setup = "module load cuda\\nexport A=1"
command = "kernelscale"
log_dir = "logs"
templates = "tpl"
"""


@pytest.mark.parametrize("body", ["full", "demo", "cifar10-20k", "demo-slurm"])
def test_job_toml_loads_back_to_the_same_job(tmp_path, body):
    from kernelscale.config import TABLES, job_toml

    if body == "full":
        job = tmp_path / "full.toml"
        job.write_text(FULL)
    else:
        from kernelscale.bundled import BUNDLED_JOBS

        job = BUNDLED_JOBS / f"{body}.toml"
    cfg = load_job(job)
    back_file = tmp_path / "elsewhere" / "back.toml"
    back_file.parent.mkdir()
    back_file.write_text(job_toml(cfg))
    back = load_job(back_file)
    assert back.workdir == cfg.workdir.resolve()
    for name in TABLES:
        a, b = getattr(cfg, name), getattr(back, name)
        if name == "job":
            a, b = dataclasses.replace(a, workdir=""), dataclasses.replace(b, workdir="")
        if name == "slurm" and a.templates:  # relative to the job file: made absolute
            assert b.templates == str((job.parent / a.templates).resolve())
            b = dataclasses.replace(b, templates=a.templates)
        assert a == b, name
    # every value the file sets is written as a value, not as a comment
    import tomllib

    raw, written = tomllib.loads(job.read_text()), tomllib.loads(job_toml(cfg))
    for name, table in raw.items():
        assert set(table) <= set(written[name]), name


# ------------------------------------------------------------- [compare] and [publish]

SHARE = """
[job]
workdir = "w"
[kernel]
[evaluate]
labels = "lab.npz"
[compare]
kernels = "other"
[report]
[publish]
repo = "hf://datasets/o/out"
"""


def _share_with(tmp_path, table: str, line: str, name: str = "file.toml"):
    """SHARE with ``line`` in ``[table]`` (replacing that key's line when there is one)."""
    key = line.split("=")[0].strip()
    body = "".join(x + "\n" for x in SHARE.splitlines() if not x.startswith(f"{key} ="))
    job = tmp_path / name
    job.write_text(body.replace(f"[{table}]\n", f"[{table}]\n{line}\n", 1))
    return job


@pytest.mark.parametrize("item, toml_line, expected", [
    ("compare.kernels=hf://datasets/o/n/cfg/kernel", 'kernels = "hf://datasets/o/n/cfg/kernel"',
     ("hf://datasets/o/n/cfg/kernel",)),
    ('compare.kernels=["a", "hf://datasets/o/n@v1/k"]', 'kernels = ["a", "hf://datasets/o/n@v1/k"]',
     ("a", "hf://datasets/o/n@v1/k")),
    ("compare.k=5", "k = 5", 5),
    ("compare.sample=100", "sample = 100", 100),
    ("compare.out=", 'out = ""', ""),
    ("compare.labels=cifar10:data/c", 'labels = "cifar10:data/c"', "cifar10:data/c"),
    ("publish.repo=hf://datasets/me/k@cfg-a/folder", 'repo = "hf://datasets/me/k@cfg-a/folder"',
     "hf://datasets/me/k@cfg-a/folder"),
    ("publish.what=kernel,report", 'what = ["kernel", "report"]', ("kernel", "report")),
    ("publish.what=workdir", 'what = "workdir"', ("workdir",)),
    ("publish.private=true", "private = true", True),
    ("publish.revision=2024", 'revision = "2024"', "2024"),
    ("publish.message=first kernels", 'message = "first kernels"', "first kernels"),
])
def test_compare_and_publish_set_values_are_read_like_the_files_own(tmp_path, item,
                                                                    toml_line, expected):
    table, field = item.partition("=")[0].split(".")
    base = tmp_path / "base.toml"
    base.write_text(SHARE)
    by_set = load_job(base, sets=[item])
    by_file = load_job(_share_with(tmp_path, table, toml_line))
    assert getattr(getattr(by_set, table), field) == expected
    assert getattr(by_set, table) == getattr(by_file, table)


@pytest.mark.parametrize("table, line, message", [
    ("compare", "kernels = []", r"\[compare\]: kernels: name the kernel\(s\) to compare"),
    ("compare", "kernels = 3", r"\[compare\] kernels must be a kernel path or a list"),
    ("compare", 'kernels = ["a", ""]', r"\[compare\] kernels must be a kernel path"),
    ("compare", 'kernels = "hf://models/o/n/k"', r"\[compare\] kernels: hf://models/o/n/k: "
     "only dataset repos"),
    ("compare", "k = 0", r"\[compare\]: k must be >= 1, not 0"),
    ("compare", "sample = 1", r"\[compare\]: sample must be >= 2 rows"),
    ("publish", 'repo = "me/k"', r"\[publish\] repo 'me/k': expected hf://datasets/OWNER/NAME"),
    ("publish", 'repo = "hf://datasets/o"', r"\[publish\] repo: hf://datasets/o: expected"),
    ("publish", 'what = "kernel,figures"', r"\[publish\] what 'kernel,figures': expected "
     "some of kernel, results, report, workdir"),
    ("publish", 'what = ["workdir", "kernel"]', "the workdir holds the others"),
    ("publish", 'repo = "hf://datasets/o/out@a"\nrevision = "b"',
     r"\[publish\]: revision 'b' contradicts the @a of repo"),
    ("publish", f'revision = "{"ab" * 20}"', "is a commit; publishing commits to a branch"),
])
def test_bad_compare_and_publish_values_fail_on_load_naming_file_and_key(tmp_path, table,
                                                                         line, message):
    job = _share_with(tmp_path, table, line)
    with pytest.raises(ConfigError, match=message) as e:
        load_job(job)
    assert str(e.value).startswith(str(job)), str(e.value)


def test_missing_or_unwritten_publish_and_compare_values_are_named(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[kernel]\n[publish]\nwhat = "report"\nrepo = "hf://datasets/o/n"\n')
    with pytest.raises(ConfigError, match=r"job\.toml \[publish\] what 'report': the job "
                       r"writes no report \(no \[report\] table\)"):
        load_job(job)
    job.write_text('[kernel]\n[publish]\nwhat = "results"\nrepo = "hf://datasets/o/n"\n'
                   '[evaluate]\njson = ""\n')
    with pytest.raises(ConfigError, match="writes no results"):
        load_job(job)
    job.write_text("[kernel]\n[publish]\n")
    with pytest.raises(ConfigError, match=r'\[publish\]: repo: name the dataset repo'):
        load_job(job)
    # a table added by --set is checked as a whole too, naming the --set
    with pytest.raises(ConfigError, match=r"^\S+job\.toml \[compare\] with --set compare\.k: "
                       "kernels: name the kernel"):
        load_job(job, sets=["compare.k=3", "publish.repo=hf://datasets/o/n"])


def test_compare_and_publish_tables_reach_their_stage_configs(tmp_path):
    wd = tmp_path / "w"
    base = tmp_path / "base.toml"
    base.write_text(SHARE)
    cfg = load_job(base, sets=[f"job.workdir={wd}", "compare.k=4", "compare.sample=9",
                               "compare.read_threads=2",
                               'compare.kernels=["../o/kernel", "hf://datasets/o/n/k"]'])
    assert cfg.compare_targets() == [(str(wd / "../o/kernel"), wd / "compare" / "1"),
                                     ("hf://datasets/o/n/k", wd / "compare" / "2")]
    assert cfg.compare_options() == {"k": 4, "sample": 9, "seed": 0, "workers": 2}
    assert cfg.compare_labels() == str(wd / "lab.npz")  # the [evaluate] labels
    # the report shows the first comparison unless [report] compare names one
    assert cfg.report_config(show_progress=False).compare == wd / "compare/1/compare.json"
    one = load_job(base, sets=[f"job.workdir={wd}", "compare.labels=own.npz",
                               "report.compare=elsewhere"])
    assert one.compare_targets() == [(str(wd / "other"), wd / "compare")]
    assert one.compare_labels() == str(wd / "own.npz")
    assert one.report_config(show_progress=False).compare == wd / "elsewhere"
    assert load_job(base, sets=["compare.out="]).comparison() is None
    # publish: the kernel, results and report by default, each to the repo
    pubs = cfg.publish_configs(show_progress=False)
    assert [p.path for p in pubs] == [wd / "kernel", wd / "results.json", wd / "report"]
    assert {(p.target, p.revision, p.create, p.private, p.license) for p in pubs} == {
        ("hf://datasets/o/out", None, True, False, "other")}
    cfg = load_job(base, sets=[f"job.workdir={wd}", "publish.what=workdir",
                               "publish.revision=cfg-b", "publish.private=true"])
    (pub,) = cfg.publish_configs()
    assert (pub.path, pub.revision, pub.private) == (wd, "cfg-b", True)
    # an hf:// train kernel stays a spec (a Path would fold its '//')
    cfg = load_job(base, sets=["report.train_kernel=hf://datasets/o/n/kernel-train"])
    assert cfg.report_config(show_progress=False).train_kernel == \
        "hf://datasets/o/n/kernel-train"
