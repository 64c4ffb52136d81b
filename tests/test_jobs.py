import json
import os
import re
import signal

import numpy as np
import pytest

from kernelscale.config import load_job
from kernelscale.errors import ConfigError
from tests.conftest import ROOT, run_cli

SMALL_DEMO = """
[job]
name = "demo-small"

[simulate]
out = "simulated"
runs = 60
files = 3
n_train = 600
n_test = 150
classes = 10
seed = 1

[ingest]
source = "simulated"
store = "store"

[kernel]
out = "kernel"
device = "cpu"

[evaluate]
labels = "simulated/labels.npz"
k = 3
json = "results.json"
"""


def test_demo_job_shape_is_valid():
    cfg = load_job(ROOT / "jobs" / "demo.toml")
    assert cfg.simulate and cfg.ingest and cfg.kernel and cfg.evaluate


def test_small_demo_end_to_end(tmp_path):
    from kernelscale.kernelread import load_kernel
    from tests.reference import reference_kernel

    job = tmp_path / "demo.toml"
    job.write_text(SMALL_DEMO)
    p = run_cli("run", str(job), "--workdir", str(tmp_path / "w"))
    assert "average single-model accuracy" in p.stdout
    assert "kernel accuracy (k-NN w/ k=3)" in p.stdout
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["runs"] == 60 and res["k"] == 3
    # the numbers printed come from an independent recomputation
    import glob

    import torch
    files = sorted(glob.glob(str(tmp_path / "w" / "simulated" / "**" / "log.pt"),
                             recursive=True))
    objs = [torch.load(f, weights_only=True) for f in files]
    te = torch.cat([o["logits"] for o in objs])
    tr = torch.cat([o["logits_train"] for o in objs])
    lab = np.load(tmp_path / "w" / "simulated" / "labels.npz")
    lt, ltr = torch.from_numpy(lab["test"]), torch.from_numpy(lab["train"])
    single = (te.argmax(-1) == lt).float().mean(1).mean().item() * 100
    ens = (te.mean(0).argmax(1) == lt).float().mean().item() * 100
    ref = torch.from_numpy(reference_kernel(te.numpy(), tr.numpy()))
    knn = (ltr[ref.topk(3, dim=1).indices].mode(1).values == lt).float().mean().item() * 100
    assert res["single_model_accuracy"] == pytest.approx(single, abs=1e-4)
    assert res["ensemble_accuracy"] == pytest.approx(ens, abs=1e-4)
    assert res["knn_accuracy"] == pytest.approx(knn, abs=1.5)  # ties in top-3 may differ
    K = load_kernel(tmp_path / "w" / "kernel").array[...]
    assert np.abs(K - ref.numpy()).max() <= 1e-5
    # re-running the job is a no-op for every stage and prints the same table
    p2 = run_cli("run", str(job), "--workdir", str(tmp_path / "w"))
    assert p2.stdout.splitlines()[-3:] == p.stdout.splitlines()[-3:]


def test_evaluate_json_keys(tmp_path, small_store):
    from tests.reference import labels_file

    store, *_ = small_store
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    lab = labels_file(tmp_path / "labels.npz", 96, 40, 5)
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(lab), "--json")
    d = json.loads(p.stdout)
    assert {"single_model_accuracy", "ensemble_accuracy", "knn_accuracy", "k",
            "runs"} <= set(d)
    assert d["runs"] == 24


@pytest.mark.parametrize("train,test,msg", [
    (np.zeros(95, np.int64), np.zeros(40, np.int64), "95 train labels, but the store has 96"),
    (np.zeros(96, np.int64), np.full(40, 5, np.int64), "out of range [0, 5)"),
    (np.zeros(96, np.int64), -np.ones(40, np.int64), "out of range"),
])
def test_bad_labels_one_line_error(tmp_path, small_store, train, test, msg):
    store, *_ = small_store
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    np.savez(tmp_path / "labels.npz", train=train, test=test)
    p = run_cli("evaluate", "--store", str(store), "--kernel", str(tmp_path / "k"),
                "--labels", str(tmp_path / "labels.npz"), check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels.npz" in lines[0] and msg in lines[0], p.stderr


def test_runs_beyond_store_one_line_error(tmp_path, small_store):
    store, *_ = small_store
    p = run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"), "--runs", "99",
                check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"kernelscale: error: --runs 99 is larger than the 24 runs {store} holds"]


def test_unknown_job_key_is_an_error(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text('[kernel]\nout = "k"\nprecison = "fp32"\n')
    with pytest.raises(ConfigError, match="unknown key.*precison"):
        load_job(job)
    job.write_text('[kernal]\nout = "k"\n')
    with pytest.raises(ConfigError, match="unknown table.*kernal"):
        load_job(job)
    job.write_text('[kernel]\nout = 3\n')
    with pytest.raises(ConfigError, match=r"\[kernel\] out must be str"):
        load_job(job)


def test_info_on_kernel_and_store(tmp_path, small_store):
    store, *_ = small_store
    run_cli("kernel", "--store", str(store), "--out", str(tmp_path / "k"))
    out = run_cli("info", str(tmp_path / "k")).stdout
    assert "complete True" in out and "runs 24" in out
    out = run_cli("info", str(store)).stdout
    assert "runs 24" in out and out.count("log.pt") == 3


def test_evaluate_table_takes_every_evaluate_option(tmp_path):
    """[evaluate] train_kernel (computed by the job), per_run and weighting reach the
    evaluation exactly as the command line's options do."""
    job = tmp_path / "demo.toml"
    job.write_text(SMALL_DEMO.replace('json = "results.json"', '''json = "results.json"
weighting = "power"
power = 4.0
train_kernel = "train-kernel"
per_run = true'''))
    run_cli("run", str(job), "--workdir", str(tmp_path / "w"))
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["selection"]["method"] == "leave-one-out"
    assert res["selection"]["train_kernel"] == str(tmp_path / "w" / "train-kernel")
    assert res["setting"]["weighting"] == "power" and res["setting"]["param"] == 4.0
    assert len(res["per_run_accuracy"]) == 60
    p = run_cli("evaluate", "--store", str(tmp_path / "w" / "store"), "--kernel",
                str(tmp_path / "w" / "kernel"), "--labels",
                str(tmp_path / "w" / "simulated" / "labels.npz"), "--weighting", "power",
                "--power", "4", "--train-kernel", str(tmp_path / "w" / "train-kernel"),
                "--json", "--per-run")
    cli = json.loads(p.stdout)
    for key in ("selection", "setting", "per_run_accuracy", "knn_accuracy", "oracle"):
        assert cli[key] == res[key], key


# --------------------------------------------- run --set, --dry-run and --only

#: SMALL_DEMO cut down further: 20 runs of 300 train / 80 test examples, 4 classes
TINY = (SMALL_DEMO.replace("runs = 60", "runs = 20").replace("files = 3", "files = 2")
        .replace("n_train = 600", "n_train = 300").replace("n_test = 150", "n_test = 80")
        .replace("classes = 10", "classes = 4"))


def _logits(folder):
    import torch

    objs = [torch.load(f, weights_only=True) for f in sorted(folder.glob("**/log.pt"))]
    return (torch.cat([o["logits"] for o in objs]).numpy(),
            torch.cat([o["logits_train"] for o in objs]).numpy())


def test_dry_run_prints_the_resolved_job_and_its_stages_and_runs_nothing(tmp_path):
    import tomllib

    job = tmp_path / "tiny.toml"
    job.write_text(TINY)
    wd = tmp_path / "w"
    sets = ["--set", "kernel.topk=50", "--set", f"job.workdir={wd}",
            "--set", "kernel.max_memory=2GiB", "--set", "evaluate.weighting=power"]
    p = run_cli("run", str(job), "--dry-run", *sets)
    doc = tomllib.loads(p.stdout)  # the whole output is a job file
    assert doc["kernel"]["topk"] == 50 and doc["kernel"]["max_memory"] == "2GiB"
    assert doc["evaluate"]["weighting"] == "power" and doc["job"]["workdir"] == str(wd)
    steps = [line.split()[2] for line in p.stdout.splitlines()
             if re.match(r"^#   \d\. ", line)]
    assert steps == ["simulate", "ingest", "kernel", "evaluate"]
    assert f"kernel    reads store {wd / 'store'} (from ingest); writes {wd / 'kernel'}" \
        in p.stdout
    assert not wd.exists(), "a dry run writes nothing"
    # it loads back to the job that `run` with the same --set runs
    back = tmp_path / "elsewhere" / "resolved.toml"
    back.parent.mkdir()
    back.write_text(p.stdout)
    a = load_job(job, sets=[s for s in sets if s != "--set"])
    b = load_job(back)
    assert a.workdir == b.workdir
    for name in ("simulate", "ingest", "kernel", "evaluate", "curve", "report", "slurm"):
        assert getattr(a, name) == getattr(b, name), name
    p = run_cli("run", str(back), "--dry-run", "--only", "kernel", "--only", "evaluate",
                check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"kernelscale: error: --only kernel,evaluate: the kernel stage reads the store "
        f"{wd / 'store'}, which is missing; run the ingest stage first (--only ingest)")


@pytest.mark.parametrize("args, message", [
    (["--set", "kernel.topk=many"], "--set kernel.topk must be int, got str 'many'"),
    (["--set", "kernel.max_memory=lots"], "--set kernel.max_memory 'lots': cannot read it"),
    (["--set", "kernal.topk=5"], "--set kernal.topk=5: no table 'kernal'"),
    (["--set", "kernel.pairs=test-x"], "--pairs must be one of test-train"),
    (["--only", "kernel,fit"], "--only kernel,fit: 'fit' is not a stage"),
    (["--only", "curve"], "has no [curve] table"),
])
def test_bad_set_or_only_is_one_line_and_exit_2(tmp_path, args, message):
    job = tmp_path / "tiny.toml"
    job.write_text(TINY)
    for extra in (["--dry-run"], []):
        p = run_cli("run", str(job), "--workdir", str(tmp_path / "w"), *args, *extra,
                    check=False)
        assert p.returncode == 2, p.stderr
        (line,) = p.stderr.strip().splitlines()
        assert line.startswith("kernelscale: error: ") and message in line, line
    assert not (tmp_path / "w").exists()


def test_run_with_set_writes_to_the_set_workdir_with_the_set_options(tmp_path):
    """--set job.workdir puts every output there; --set kernel.topk makes the kernel a
    top-K one whose neighbours are those of the float64 reference kernel."""
    from kernelscale.kernelread import load_kernel
    from tests.reference import reference_kernel

    job = tmp_path / "tiny.toml"
    job.write_text(TINY)
    wd = tmp_path / "there"
    run_cli("run", str(job), "--set", f"job.workdir={wd}", "--set", "kernel.topk=7",
            "--set", "evaluate.json=out.json")
    assert sorted(p.name for p in wd.iterdir()) == ["kernel", "out.json", "simulated",
                                                     "store"]
    k = load_kernel(wd / "kernel")
    assert k.topk == 7
    values = k.group["values"][...]
    ref = reference_kernel(*_logits(wd / "simulated"))
    assert np.abs(values - -np.sort(-ref, axis=1)[:, :7]).max() <= 1e-5
    res = json.loads((wd / "out.json").read_text())
    assert res["runs"] == 20


def test_only_runs_the_named_stages_and_refuses_missing_inputs(tmp_path):
    job = tmp_path / "tiny.toml"
    job.write_text(TINY)
    w = tmp_path / "w"
    wd = ["--workdir", str(w)]

    def refused(*only, what):
        p = run_cli("run", str(job), *wd, *only, check=False)
        assert p.returncode == 2
        (line,) = p.stderr.strip().splitlines()
        assert what in line, line

    refused("--only", "ingest", what=f"the ingest stage reads the source {w / 'simulated'}, "
            "which is missing; run the simulate stage first (--only simulate)")
    assert not (w / "store").exists()
    run_cli("run", str(job), *wd, "--only", "simulate,ingest")
    assert (w / "store" / "manifest.json").is_file() and not (w / "kernel").exists()
    refused("--only", "evaluate", what=f"the evaluate stage reads the kernel {w / 'kernel'}, "
            "which is missing; run the kernel stage first (--only kernel)")
    run_cli("run", str(job), *wd, "--only", "kernel")
    assert (w / "kernel").is_dir() and not (w / "results.json").exists()
    p = run_cli("run", str(job), *wd, "--only", "evaluate")
    assert "kernel accuracy (k-NN w/ k=3)" in p.stdout and (w / "results.json").is_file()
    assert "kernel:" not in p.stdout and "ingest:" not in p.stdout  # nothing else ran
    # --only ingest again adds nothing: the same files are in the store
    assert "0 file(s) ingested" in run_cli("run", str(job), *wd, "--only", "ingest").stdout


def test_every_evaluate_option_has_a_field_of_the_evaluate_table():
    from dataclasses import fields

    from kernelscale.cli import build_parser
    from kernelscale.config import EvaluateTable

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, type(p._subparsers._group_actions[0])))
    dests = {a.dest for a in sub.choices["evaluate"]._actions if a.option_strings}
    # --store and --kernel are the [kernel] table's; the rest are global options
    dests -= {"store", "kernel", "help", "quiet", "verbose", "version"}
    assert dests <= {f.name for f in fields(EvaluateTable)}, \
        dests - {f.name for f in fields(EvaluateTable)}


def test_evaluate_table_options_give_what_the_evaluate_command_gives(tmp_path):
    """Every [evaluate] option set by --set reaches the evaluation: results.json is the
    JSON of `kernelscale evaluate` given the same options."""
    job = tmp_path / "tiny.toml"
    job.write_text(TINY)
    w = tmp_path / "w"
    sets = {"k": "5", "weighting": "softmax", "temperature": "0.05", "select": "true",
            "seed": "4", "ablations": "abl", "per_run": "true", "device": "cpu",
            "read_threads": "1"}
    args = [x for k, v in sets.items() for x in ("--set", f"evaluate.{k}={v}")]
    run_cli("run", str(job), "--workdir", str(w), *args)
    res = json.loads((w / "results.json").read_text())
    assert sorted(p.name for p in (w / "abl").iterdir()) == [
        "class-0", "class-1", "class-2", "class-3", "no-log-softmax"]
    p = run_cli("evaluate", "--store", str(w / "store"), "--kernel", str(w / "kernel"),
                "--labels", str(w / "simulated" / "labels.npz"), "--k", "5",
                "--weighting", "softmax", "--temperature", "0.05", "--select", "--seed", "4",
                "--ablations", str(w / "abl"), "--device", "cpu", "--read-threads", "1",
                "--json", "--per-run")
    cli = json.loads(p.stdout)
    assert res["k"] == 5 and res["setting"]["weighting"] == "softmax"
    assert res["setting"]["param"] == 0.05
    assert res["selection"]["method"] == "cross-fit" and len(res["per_run_accuracy"]) == 20
    assert len(res["ablations"]) == 5
    for key in set(res) | set(cli):
        if key != "provenance":
            assert cli[key] == res[key], key


# ---------------------------------------------------------- [compare] and [publish]

TOKEN = "hf_WRITEtokenOfTheShareJob0123456789"
READ_ONLY = "hf_READtokenOfTheShareJob9876543210"

SHARE_JOB = """
[job]
name = "share"

[kernel]
device = "cpu"
chunks = "16x32"

[evaluate]
labels = "{root}/labels.npz"
select = true
train_kernel = "hf://datasets/me/tk/kernel-train"

[compare]
kernels = ["hf://datasets/me/other/kernel", "{root}/other-top"]
k = 5

[report]
examples = 2

[publish]
repo = "hf://datasets/me/out"
message = "the share job"
"""


def hub_env(server, home, **extra) -> dict:
    return {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.fixture(scope="module")
def hub():
    from tests.hubserver import HubServer

    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def shared(tmp_path_factory, hub):
    """SHARE_JOB run once with a write token, over a store ingested beforehand (40 test x
    96 train, 5 classes, 13 runs). Published first: another configuration's kernel
    (seed 1) as hf://datasets/me/other/kernel, and the store's train x train kernel as
    hf://datasets/me/tk/kernel-train; the other configuration's top-20 kernel stays
    local. Returns (root, job file, workdir, the run, HF home)."""
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.publish import PublishConfig, publish
    from tests.conftest import ingest_dir
    from tests.hubserver import private_hf_home
    from tests.reference import labels_file, random_source

    root = tmp_path_factory.mktemp("share")
    wd = root / "w"
    random_source(root / "src", [6, 7], seed=0)
    random_source(root / "src-b", [6, 7], seed=1)
    labels_file(root / "labels.npz", 96, 40, 5, seed=7)
    ingest_dir(root / "src", wd / "store", show_progress=False)
    ingest_dir(root / "src-b", root / "store-b", show_progress=False)
    for store, out, kw in ((root / "store-b", root / "other" / "kernel", {}),
                           (root / "store-b", root / "other-top", {"topk": 20}),
                           (wd / "store", root / "tk" / "kernel-train",
                            {"pairs": "train-train"})):
        compute_kernel(KernelConfig(store=store, out=out, device="cpu", show_progress=False,
                                    **kw))
    with pytest.MonkeyPatch.context() as mp:
        private_hf_home(root / "publisher", mp)
        for path, repo in ((root / "other" / "kernel", "me/other"),
                           (root / "tk" / "kernel-train", "me/tk")):
            publish(PublishConfig(path, f"hf://datasets/{repo}", create=True,
                                  show_progress=False), endpoint=hub.url, token=TOKEN)
    job = root / "share.toml"
    job.write_text(SHARE_JOB.format(root=root))
    home = root / "hf-home"
    p = run_cli("run", str(job), "--workdir", str(wd), env=hub_env(hub, home, HF_TOKEN=TOKEN))
    return root, job, wd, p, home


def _top(K: np.ndarray, k: int) -> list[set]:
    """Each row's k largest columns (value descending, column ascending), as sets."""
    return [set(sorted(range(K.shape[1]), key=lambda j: (-K[i, j], j))[:k])
            for i in range(K.shape[0])]


def test_a_job_compares_with_a_hub_kernel_reports_and_publishes(shared, hub):
    """The job's kernel is compared with a published kernel (fetched and verified) and a
    local top-K one, the report shows the first comparison, the [evaluate] train kernel
    comes from the Hub, and the kernel, results and report land in the repo as they are
    on disk; publishing again commits nothing. The token is never shown or stored."""
    import zarr

    from kernelscale.evaluation import evaluate
    from kernelscale.labels import load_labels

    root, job, wd, p, home = shared
    doc = json.loads((wd / "compare" / "1" / "compare.json").read_text())
    assert doc["a"]["path"] == str(wd / "kernel")
    assert doc["b"]["path"] == "hf://datasets/me/other/kernel" and doc["k"] == 5
    A = zarr.open_group(str(wd / "kernel"), mode="r")["kernel"][...]
    B = zarr.open_group(str(root / "other" / "kernel"), mode="r")["kernel"][...]
    for o in doc["overlap"]:
        jac = [len(x & y) / len(x | y) for x, y in zip(_top(A, o["k"]), _top(B, o["k"]),
                                                       strict=True)]
        assert o["mean_jaccard"] == pytest.approx(np.mean(jac), abs=1e-6)
    assert 0 < doc["overlap"][-1]["mean_jaccard"] < 1
    with np.load(root / "labels.npz") as z:
        train, test = z["train"], z["test"]
    vote = [np.bincount(train[sorted(s)], minlength=5).argmax() for s in _top(B, 5)]
    assert doc["knn"]["accuracy_b"] == pytest.approx(np.mean(vote == test) * 100, abs=1e-4)
    top = json.loads((wd / "compare" / "2" / "compare.json").read_text())
    assert top["b"]["kind"] == "top-20" and top["rank_correlation"]["method"] == "neighbours"
    assert list(home.glob("hub/datasets--me--other/snapshots/*/kernel/zarr.json"))
    # the report shows the first comparison
    assert (wd / "report" / "compare.json").read_bytes() == \
        (wd / "compare" / "1" / "compare.json").read_bytes()
    assert "hf://datasets/me/other/kernel" in (wd / "report" / "index.html").read_text()
    # leave-one-out on the Hub's train x train kernel, as on the local one; none computed
    res = json.loads((wd / "results.json").read_text())
    assert not (wd / "kernel-train").exists()
    local = evaluate(str(wd / "store"), str(wd / "kernel"),
                     load_labels(str(root / "labels.npz")), k=3, select=True,
                     train_kernel=root / "tk" / "kernel-train").as_json()
    assert res["selection"]["method"] == "leave-one-out"
    for key in ("setting", "accuracy", "selection_accuracy"):
        assert res["selection"][key] == local["selection"][key], key
    # published: every file of the kernel, the results and the report, byte for byte
    served = hub.files("me/out")
    for sub in ("kernel", "report"):
        for f in (wd / sub).rglob("*"):
            rel = f.relative_to(wd).as_posix()
            if f.is_file() and not any(part.startswith(".") and part != ".done"
                                       for part in f.relative_to(wd).parts):
                assert served[rel] == f.read_bytes(), rel
    assert served["results.json"] == (wd / "results.json").read_bytes()
    assert "README.md" in served
    assert p.stdout.count("publish: hf://datasets/me/out (branch main): uploaded") == 3
    commits = len(hub.requests("POST", "/api/datasets/me/out/commit/main"))
    again = run_cli("run", str(job), "--workdir", str(wd), "--only", "publish",
                    env=hub_env(hub, home, HF_TOKEN=TOKEN))
    assert again.stdout.count("up to date") == 3
    assert len(hub.requests("POST", "/api/datasets/me/out/commit/main")) == commits
    for text in (p.stdout, p.stderr, again.stdout, again.stderr):
        assert TOKEN not in text
    for base in (wd, home):
        for f in base.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert TOKEN.encode() not in f.read_bytes(), f


def test_dry_run_lists_compare_and_publish_and_touches_no_hub(tmp_path):
    import tomllib

    from kernelscale.pipeline import plan_run

    job = tmp_path / "share.toml"
    job.write_text(SHARE_JOB.format(root=tmp_path))
    wd = tmp_path / "w"
    sets = [f"job.workdir={wd}", "compare.k=3", "publish.what=kernel,report",
            "publish.revision=cfg-b", 'compare.kernels=["hf://datasets/me/o@v1/kernel"]']
    p = run_cli("run", str(job), "--dry-run", *[x for s in sets for x in ("--set", s)],
                check=False, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    steps = dict(re.findall(r"^#   \d\. (\w+) +(.*)$", p.stdout, flags=re.M))
    assert list(steps) == ["kernel", "evaluate", "compare", "report", "publish"]
    assert steps["compare"] == (f"reads kernel {wd / 'kernel'} (from kernel), kernel "
                                "hf://datasets/me/o@v1/kernel (on the Hub); writes "
                                f"{wd / 'compare' / 'compare.json'}")
    assert f"comparison {wd / 'compare' / 'compare.json'} (from compare)" in steps["report"]
    assert "kernel hf://datasets/me/tk/kernel-train (on the Hub)" in steps["evaluate"]
    assert steps["publish"] == (f"reads kernel {wd / 'kernel'} (from kernel), report "
                                f"{wd / 'report'} (from report); writes "
                                "hf://datasets/me/out (branch cfg-b)")
    doc = tomllib.loads(p.stdout)
    assert doc["compare"]["kernels"] == ["hf://datasets/me/o@v1/kernel"]
    assert doc["publish"]["what"] == "kernel,report" and doc["compare"]["k"] == 3
    # the store is not there: the dry run says so, and runs and fetches nothing
    assert p.returncode == 2 and "the kernel stage reads the store" in p.stderr
    assert not wd.exists()
    back = tmp_path / "back.toml"
    back.write_text(p.stdout)
    a, b = load_job(job, sets=sets), load_job(back)
    assert (a.compare, a.publish) == (b.compare, b.publish)
    assert plan_run(b).stages == plan_run(a).stages


@pytest.mark.parametrize("case", ["read-only token", "no network"])
def test_a_failed_publish_is_one_line_and_keeps_the_outputs(shared, hub, tmp_path, case):
    import shutil

    root, job, wd, _, home = shared
    w = tmp_path / "w"
    shutil.copytree(wd, w, symlinks=True)
    (w / ".kernelscale-published.json").unlink()
    before = {f: f.read_bytes() for f in w.rglob("*") if f.is_file()}
    hub.read_only_tokens.add(READ_ONLY)
    env = (hub_env(hub, home, HF_TOKEN=READ_ONLY) if case == "read-only token" else
           hub_env(hub, home, HF_TOKEN=TOKEN, HF_ENDPOINT="http://127.0.0.1:9"))
    p = run_cli("run", str(job), "--workdir", str(w), "--only", "publish", "--set",
                "publish.repo=hf://datasets/me/refused", env=env, check=False)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()[-1:]
    assert line.startswith("kernelscale: error: hf://datasets/me/refused: ")
    if case == "read-only token":
        assert "HTTP 403: the token lacks write access" in line
    assert "--only publish" in line and "--set publish.repo=hf://datasets/me/refused" in line
    assert [x for x in p.stderr.splitlines() if "error" in x] == [line]
    assert READ_ONLY not in p.stdout + p.stderr and TOKEN not in p.stdout + p.stderr
    assert {f: f.read_bytes() for f in w.rglob("*") if f.is_file()} == before
    assert "me/refused" not in hub.repos


_KILL_IN_SECOND_COMMIT = r"""
import os, runpy, signal, sys

import huggingface_hub

commit, calls = huggingface_hub.HfApi.create_commit, []


def create_commit(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the kernel committed, the results not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, *args, **kwargs)


huggingface_hub.HfApi.create_commit = create_commit
sys.argv = ["kernelscale", *sys.argv[1:]]
runpy.run_module("kernelscale", run_name="__main__")
"""


def test_gather_killed_while_publishing_finishes_when_run_again(shared, hub, tmp_path):
    """A Slurm gather killed during its publish stage (kill -9 with the kernel committed
    and the results not) is left to do for status and submit; the same command then
    publishes what is missing and the gather is done."""
    import dataclasses
    import shutil
    import subprocess
    import sys

    from kernelscale.atomic import atomic_write_json
    from kernelscale.config import slurm_settings
    from kernelscale.kernel import compute_kernel
    from kernelscale.slurm.geometry import plan_array
    from kernelscale.slurm.queue import SlurmPaths

    root, _, wd, _, home = shared
    w = tmp_path / "w"
    shutil.copytree(wd / "store", w / "store", symlinks=True)
    job = tmp_path / "gather.toml"
    job.write_text(f'[job]\nname = "g"\nworkdir = "{w}"\n[kernel]\ndevice = "cpu"\n'
                   f'[evaluate]\nlabels = "{root}/labels.npz"\n'
                   f'[compare]\nkernels = "{root}/other-top"\n'
                   '[publish]\nrepo = "hf://datasets/me/gathered"\n[slurm]\ntasks = 1\n')
    cfg = load_job(job)
    t = slurm_settings(cfg)
    kp = plan_array(cfg, t, need_ingest=False)
    atomic_write_json(SlurmPaths.of(cfg, t).plan, kp.as_json())
    compute_kernel(dataclasses.replace(cfg.kernel_config(show_progress=False),
                                       chunks=kp.chunks, tile=kp.tile))
    env = hub_env(hub, home, HF_TOKEN=TOKEN)
    p = subprocess.run([sys.executable, "-c", _KILL_IN_SECOND_COMMIT, "-q", "gather",
                        str(job)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "kernel/zarr.json" in hub.files("me/gathered")
    assert "results.json" not in hub.files("me/gathered")

    def gather_state() -> str:
        out = run_cli("status", str(job), env=env).stdout
        return next(x.split(":")[1].split()[0] for x in out.splitlines()
                    if x.strip().startswith("gather:"))

    assert gather_state() == "left"
    again = run_cli("gather", str(job), env=env)
    assert "(branch main): up to date" in again.stdout  # the kernel, committed before
    assert hub.files("me/gathered")["results.json"] == (w / "results.json").read_bytes()
    assert gather_state() == "done"
