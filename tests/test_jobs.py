import json

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
