import json
import re

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
