"""The HTML report: every section present, figures real PNGs, images from CIFAR-10's layout."""

import json
import pickle
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("provenance", "baselines", "knn", "runs", "k", "ablation", "interpretability")

JOB = """
[job]
name = "report-small"

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

[curve]
runs = [5, 20, "all"]

[report]
out = "report"
train_kernel = "kernel-train"
ablations = "ablations"
examples = 6
"""


class Page(HTMLParser):
    """What a reader's browser would fetch and show: ids, headings, images, links, text."""

    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.links, self.h2, self.text = [], [], [], [], []
        self.tables = 0
        self.assets = []  # anything that would load from elsewhere
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag in ("script", "link", "iframe") or (tag == "img" and "://" in a["src"]):
            self.assets.append((tag, a))
        if tag == "table":
            self.tables += 1
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.body = " ".join(" ".join(p.text).split())
    return p


def check_images(page: Page, root: Path) -> None:
    for src in page.imgs:
        assert "/" not in src and not src.startswith("."), src  # beside index.html
        data = (root / src).read_bytes()
        assert data[:8] == PNG and len(data) > 2000, src


def test_demo_job_writes_a_complete_report(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    wd = tmp_path / "w"
    out = run_cli("run", str(job), "--workdir", str(wd)).stdout.strip().splitlines()
    index = wd / "report" / "index.html"
    assert out[-1] == f"report: {index.resolve()}"
    page = parse(index)
    for sid in SECTIONS:
        assert sid in page.ids, sid
    assert {"similar", "failures", "random"} <= set(page.ids)
    assert page.assets == []
    assert all(h.startswith("#") and h[1:] in page.ids for h in page.links)
    check_images(page, wd / "report")
    assert {"accuracy-vs-runs.png", "accuracy-vs-k.png", "ablation.png",
            "most-similar.png", "baselines-runs.png"} <= set(page.imgs)
    data = json.loads((wd / "report" / "report.json").read_text())
    ev = data["evaluation"]
    body = page.body
    # provenance: the store's files and runs
    manifest = json.loads((wd / "store" / "manifest.json").read_text())
    for f in manifest["files"]:
        assert f["name"] in body and f["sha256"][:16] in body
    # the numbers shown are the evaluation's, selected and oracle labelled as such
    assert f"{ev['ensemble_accuracy']:.2f}" in body and f"{ev['knn_accuracy']:.2f}" in body
    assert ev["selection"]["method"] == "leave-one-out"
    assert f"{ev['selection']['accuracy']:.2f}" in body and "honest" in body
    assert f"{ev['oracle']['accuracy']:.2f}" in body and "oracle" in body
    assert ev["oracle"]["accuracy"] >= ev["selection"]["accuracy"]
    # the curve and its crossover statement
    curve = json.loads((wd / "curve" / "curve.json").read_text())
    assert [p["runs"] for p in curve["points"]] == [5, 20, 60]
    c = curve["crossover"]
    assert (f"from {c} runs on" in body) if c is not None else ("not ahead" in body)
    # ablations: ten single-class kernels and the raw-logit one
    assert [a["name"] for a in ev["ablations"]] == [f"class-{i}" for i in range(10)] + [
        "no-log-softmax"]
    assert body.count(" only") >= 10 and "no log-softmax (raw logits)" in body
    # report.json: one provenance for the whole report, rounded, no per-run arrays
    from kernelscale import __version__
    from kernelscale.store import Store
    from tests.test_evaluation import assert_rounded

    assert_rounded(data)
    prov = data["provenance"]
    assert prov["store_fingerprint"] == Store.open(wd / "store").fingerprint()
    assert prov["kernel"] == str((wd / "kernel").resolve())
    assert prov["kernel_identity"]["runs"] == 60 and prov["device"] == "cpu"
    assert prov["kernelscale_version"] == __version__ and prov["torch_version"]
    assert "provenance" not in ev and "per_run_accuracy" not in ev
    assert not {"store", "kernel", "labels"} & set(data)  # they are in the provenance
    assert ev["crossfit"]["method"] == "cross-fit"  # beside leave-one-out: its own section
    assert data["curve"]["provenance"]["store_fingerprint"] == prov["store_fingerprint"]
    assert prov["store_fingerprint"] in body and f"kernelscale {__version__}" in body
    # interpretability tables without images, with the counts of the views
    assert "views are tables" in body
    assert f"{data['most_similar']['count_above']} of 150 test examples" in body
    assert len(data["random"]["examples"]) == 6
    # a second run rebuilds the report in place
    run_cli("run", str(job), "--workdir", str(wd))
    assert parse(index).ids == page.ids
    assert not [p for p in wd.iterdir() if p.name.startswith(".report")]


@pytest.fixture
def small_kernel(tmp_path_factory):
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.simulation import simulate
    from tests.conftest import ingest_dir

    d = tmp_path_factory.mktemp("rk")
    simulate(d / "sim", runs=30, files=1, n_train=300, n_test=80, seed=2, progress=False)
    ingest_dir(d / "sim", d / "store", show_progress=False)
    compute_kernel(KernelConfig(store=d / "store", out=d / "kernel", device="cpu",
                                show_progress=False))
    return d


def fake_images(n_train, n_test):
    from kernelscale.interpret import Images

    rng = np.random.default_rng(0)
    return Images(rng.integers(0, 255, (n_train, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 255, (n_test, 32, 32, 3), dtype=np.uint8),
                  tuple(f"name{c}" for c in range(10)), "cifar10:/fake")


def test_report_with_images_draws_grids(tmp_path, small_kernel, monkeypatch):
    from kernelscale import report

    d = small_kernel
    seen = []

    def loader(spec):
        seen.append(spec)
        return fake_images(300, 80), "images from a fake loader"

    monkeypatch.setattr(report, "load_images", loader)
    cfg = report.ReportConfig(store=d / "store", kernel=d / "kernel",
                              labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r",
                              images="cifar10:/fake", examples=4)
    index = report.build_report(cfg)
    assert seen == ["cifar10:/fake"]
    page = parse(index)
    check_images(page, tmp_path / "r")
    assert {"similar-grid.png", "failures-grid.png", "random-grid.png"} <= set(page.imgs)
    assert "images from a fake loader" in page.body
    assert 'class="nbr"' not in index.read_text()  # grids replace the neighbour tables
    # images of the wrong size are refused and the views fall back to tables
    monkeypatch.setattr(report, "load_images",
                        lambda spec: (fake_images(299, 80), "images from a fake loader"))
    index = report.build_report(cfg)
    page = parse(index)
    assert "similar-grid.png" not in page.imgs and "views are tables" in page.body
    assert not (tmp_path / "r" / "similar-grid.png").exists()  # the old report was replaced


def test_report_is_replaced_whole_or_not_at_all(tmp_path, small_kernel, monkeypatch):
    from kernelscale import report
    from kernelscale.report import ReportError

    d = small_kernel
    cfg = report.ReportConfig(store=d / "store", kernel=d / "kernel",
                              labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r")
    index = report.build_report(cfg)
    before = index.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "fig_k", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        report.build_report(cfg)
    assert index.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temp directory left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cfg.out = tmp_path / "other"
    with pytest.raises(ReportError, match="not a kernelscale report"):
        report.build_report(cfg)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def write_fake_cifar(root: Path, n_train_per_batch: int, n_test: int) -> tuple:
    """torchvision's on-disk CIFAR-10 layout: pickled dicts of (n, 3072) uint8 rows."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train_imgs, train_labels = [], []
    for b in range(1, 6):
        x = rng.integers(0, 255, (n_train_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_train_per_batch).tolist()
        with open(base / f"data_batch_{b}", "wb") as fh:
            pickle.dump({"data": x, "labels": y}, fh)
        train_imgs.append(x)
        train_labels += y
    xt = rng.integers(0, 255, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test).tolist()
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": xt, "labels": yt}, fh)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
             "ship", "truck"]
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    return np.concatenate(train_imgs), np.asarray(train_labels), xt, np.asarray(yt), names


def test_load_images_reads_torchvision_cifar10_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    from kernelscale.interpret import load_images
    from kernelscale.labels import load_labels

    xtr, ytr, xte, yte, names = write_fake_cifar(tmp_path / "c10", 4, 6)
    # the fake files lack the real md5 sums torchvision checks; everything else is real
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    images, note = load_images(f"cifar10:{tmp_path / 'c10'}")
    assert images is not None, note
    assert images.train.shape == (20, 32, 32, 3) and images.test.shape == (6, 32, 32, 3)
    # rows are channel-major 32x32 planes; images are height x width x channel
    assert np.array_equal(images.test[2][..., 1], xte[2, 1024:2048].reshape(32, 32))
    assert np.array_equal(images.train[7][..., 0], xtr[7, :1024].reshape(32, 32))
    assert images.class_names == tuple(names)
    lab = load_labels(f"cifar10:{tmp_path / 'c10'}", download=False)
    assert np.array_equal(lab.train, ytr) and np.array_equal(lab.test, yte)
    missing, note = load_images(f"cifar10:{tmp_path / 'nothing'}")
    assert missing is None and "images unavailable" in note
    assert load_images(str(tmp_path / "labels.npz"))[0] is None


def test_report_cli_one_line_errors(tmp_path, small_kernel):
    d = small_kernel
    p = run_cli("report", "--store", str(d / "store"), "--kernel", str(d / "kernel"),
                "--labels", str(d / "sim" / "labels.npz"), "--out", str(tmp_path / "r"),
                "--curve", str(d / "sim" / "labels.npz"), check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels.npz: not a readable curve" in lines[0]
    p = run_cli("report", "--store", str(d / "store"), "--kernel", str(d / "kernel"),
                "--labels", str(d / "sim" / "labels.npz"), "--out", str(tmp_path / "r"),
                "--weighting", "softmax", "--temperature", "0", check=False)
    assert p.returncode == 2 and "--temperature must be > 0" in p.stderr


def test_report_folder_is_readable_as_a_plain_mkdir_would_make_it(tmp_path, small_kernel):
    import os
    import stat

    from kernelscale import report

    d = small_kernel
    old = os.umask(0o022)
    try:
        cfg = report.ReportConfig(store=d / "store", kernel=d / "kernel",
                                  labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r")
        report.build_report(cfg)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r").stat().st_mode)
    assert mode == 0o777 & ~0o022, oct(mode)  # not mkdtemp's 0700
