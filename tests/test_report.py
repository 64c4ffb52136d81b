"""The HTML report: every section present, figures real PNGs, images from CIFAR-10's layout,
and its numbers against independent ones: the kernel read whole with Zarr, top neighbours
by a per-row lexsort, the k-NN by a per-row numpy vote, the ensemble from the simulated
``log.pt`` files, confusion matrices by ``np.add.at``."""

import json
import os
import pickle
import re
import stat
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("summary", "provenance", "baselines", "knn", "runs", "k", "ablation", "classes",
            "confusion", "kernel-values", "heatmap", "compare", "interpretability", "run")
JSON_LINKS = {"report.json", "results.json", "timings.json"}

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
compare = "other/compare.json"
"""

#: a compare.json of a layout the report does not know: shown as a table of its numbers
GENERIC_COMPARE = {"mean_overlap": 0.3125, "nested": {"agreement": 91.5, "rows": 150},
                   "note": "two configurations", "list": [1, 2, 3]}


class Page(HTMLParser):
    """What a reader's browser would fetch and show: ids, headings, images, links, text;
    ``wrapped``: per table, whether its parent element is the scrolling wrapper."""

    VOID = {"img", "br", "meta", "input", "hr", "link"}

    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.links, self.h2, self.text = [], [], [], [], []
        self.tables = 0
        self.wrapped: list[bool] = []
        self.assets = []  # anything that would load from elsewhere
        self._in_h2 = False
        self._stack: list[tuple[str, dict]] = []

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
            parent = self._stack[-1] if self._stack else ("", {})
            self.wrapped.append(parent[0] == "div" and parent[1].get("class") == "scroll")
        if tag not in self.VOID:
            self._stack.append((tag, a))
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        if tag not in self.VOID:
            assert self._stack and self._stack[-1][0] == tag, (tag, self._stack[-3:])
            self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.body = " ".join(" ".join(p.text).split())
    return p


def section(html: str, sid: str) -> str:
    """The HTML of ``<section id=sid>``."""
    part = html[html.index(f'<section id="{sid}">'):]
    return part[:part.index("</section>")]


class Rows(HTMLParser):
    """The body rows of every table of an HTML fragment: (row class, [cell texts])."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[tuple[str, list[str]]]] = []
        self._cell: list[str] | None = None
        self._body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tbody":
            self._body = True
        elif tag == "tr" and self._body:
            self.tables[-1].append((a.get("class") or "", []))
        elif tag in ("td", "th") and self._body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._body = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check_images(page: Page, root: Path) -> None:
    for src in page.imgs:
        assert "/" not in src and not src.startswith("."), src  # beside index.html
        data = (root / src).read_bytes()
        assert data[:8] == PNG and len(data) > 2000, src


def test_demo_job_writes_a_complete_report(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    wd = tmp_path / "w"
    (wd / "other").mkdir(parents=True)  # [report] compare: a path in the workdir
    (wd / "other" / "compare.json").write_text(json.dumps(GENERIC_COMPARE))
    out = run_cli("run", str(job), "--workdir", str(wd)).stdout.strip().splitlines()
    index = wd / "report" / "index.html"
    assert out[-1] == f"report: {index.resolve()}"
    page = parse(index)
    for sid in SECTIONS:
        assert sid in page.ids, sid
    assert {"similar", "failures", "random"} <= set(page.ids)
    assert page.assets == []
    # links: the sections, and the JSON files beside index.html
    files = {h for h in page.links if not h.startswith("#")}
    assert files == JSON_LINKS | {"compare.json"}
    assert all(h[1:] in page.ids for h in page.links if h.startswith("#"))
    for f in files:
        json.loads((wd / "report" / f).read_text())
    assert json.loads((wd / "report" / "compare.json").read_text()) == GENERIC_COMPARE
    html = index.read_text(encoding="utf-8")
    generic = Rows(section(html, "compare")).tables[-1]
    assert [r[1] for r in generic] == [["mean_overlap", "0.3125"], ["nested.agreement", "91.5"],
                                       ["nested.rows", "150"], ["note", "two configurations"]]
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
    # the headline row: leave-one-out unless it reached 99% on the train rows
    sel, cf = ev["selection"], ev["crossfit"]
    want = sel if sel["selection_accuracy"] < 99.0 else cf
    assert data["headline"]["method"] == want["method"]
    assert data["headline"]["accuracy"] == want["accuracy"]
    for sid in ("summary", "knn"):
        first = Rows(section(html, sid)).tables[0][0]
        assert first[0] == "hl" and first[1][1] == f"{want['accuracy']:.2f}", (sid, first)
        assert "headline" in first[1][2]
    # results.json beside it: the evaluation with every run's accuracy and provenance
    results = json.loads((wd / "report" / "results.json").read_text())
    assert len(results["per_run_accuracy"]) == 60
    assert results["provenance"]["store_fingerprint"] == data["provenance"]["store_fingerprint"]
    assert {k: v for k, v in results.items() if k not in ("per_run_accuracy", "provenance")} == ev
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


@pytest.fixture(scope="module")
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
                "--compare", str(d / "sim" / "labels.npz"), check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels.npz: not a readable compare.json" in lines[0]
    assert not (tmp_path / "r").exists()
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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_folder_is_readable_by_the_group(tmp_path, small_kernel, monkeypatch, umask):
    """The folder and every file in it get the modes a plain mkdir/open would give them:
    readable (and the folder enterable) by the group, not mkdtemp's/mkstemp's 0700/0600."""
    from kernelscale import atomic, report

    d = small_kernel
    monkeypatch.setattr(atomic, "_UMASK", umask)  # the umask read at import
    old = os.umask(umask)
    try:
        cfg = report.ReportConfig(store=d / "store", kernel=d / "kernel",
                                  labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r")
        report.build_report(cfg)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r").stat().st_mode)
    assert mode == 0o777 & ~umask, oct(mode)
    assert mode & 0o050 == 0o050  # the group may list and enter it
    files = list((tmp_path / "r").iterdir())
    assert {"index.html", "report.json", "results.json"} <= {f.name for f in files}
    for f in files:
        fmode = stat.S_IMODE(f.stat().st_mode)
        assert fmode == 0o666 & ~umask and fmode & 0o040, (f.name, oct(fmode))


# ------------------------------------------------------------- numbers against numpy

def read_kernel(path: Path) -> np.ndarray:
    """The whole full kernel float32 (n_test, n_train), read with Zarr alone."""
    return zarr.open_group(str(path), mode="r")["kernel"][...]


def top_columns(K: np.ndarray, k: int) -> np.ndarray:
    """int (n, k): each row's k largest values' columns, ties to the smaller column."""
    cols = np.arange(K.shape[1])
    return np.array([np.lexsort((cols, -row))[:k] for row in K.astype(np.float64)])


def dense_confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


@pytest.fixture(scope="module")
def small_report(small_kernel, tmp_path_factory):
    from kernelscale.report import ReportConfig, build_report

    out = tmp_path_factory.mktemp("rep") / "r"
    index = build_report(ReportConfig(store=small_kernel / "store",
                                      kernel=small_kernel / "kernel",
                                      labels=str(small_kernel / "sim" / "labels.npz"), out=out))
    return index, json.loads((out / "report.json").read_text())


def test_per_class_and_confusion_match_numpy(small_kernel, small_report):
    from tests.test_classes import knn_reference, read_logits

    d = small_kernel
    index, data = small_report
    with np.load(d / "sim" / "labels.npz") as z:
        y_train, y_test, names = z["train"], z["test"], [str(x) for x in z["class_names"]]
    C = len(names)
    test_logits, _ = read_logits(d / "sim")
    preds = {"ensemble": test_logits.astype(np.float64).mean(0).astype(np.float16).argmax(-1),
             "knn": knn_reference(read_kernel(d / "kernel"), y_train, 3, C)}
    assert data["evaluation"]["ensemble_accuracy"] == pytest.approx(
        (preds["ensemble"] == y_test).mean() * 100)
    html = index.read_text(encoding="utf-8")
    # report.json: every nonzero cell of both matrices
    for key, pred in preds.items():
        want = dense_confusion(pred, y_test, C)
        got = np.zeros((C, C), dtype=np.int64)
        for t, p, n in data["confusion"][key]:
            assert n > 0 and got[t, p] == 0
            got[t, p] = n
        assert np.array_equal(got, want), key
    # per-class accuracy of both, in report.json and in the table
    rows = Rows(section(html, "classes")).tables[0]
    assert len(rows) == C
    for c in range(C):
        mine = y_test == c
        acc = {k: (p[mine] == c).mean() * 100 for k, p in preds.items()}
        assert data["per_class_ensemble"]["classes"][c]["accuracy"] == pytest.approx(
            acc["ensemble"], abs=1e-4)
        assert data["per_class"]["classes"][c]["accuracy"] == pytest.approx(acc["knn"],
                                                                            abs=1e-4)
        cells = rows[c][1]
        assert cells[0] == f"{names[c]} (class {c})" and cells[1] == str(mine.sum())
        assert cells[2] == f"{acc['ensemble']:.2f}" and cells[4] == f"{acc['knn']:.2f}"
    # the confusion tables: counts, the diagonal marked right, the rest wrong
    tables = Rows(section(html, "confusion")).tables
    assert len(tables) == 2
    for table, key in zip(tables, ("ensemble", "knn"), strict=True):
        want = dense_confusion(preds[key], y_test, C)
        assert len(table) == C
        for i, (_, cells) in enumerate(table):
            assert cells[0] == f"{names[i]} ({i})"
            shown = [int(re.sub(r"[^0-9]", "", x)) for x in cells[1:C + 1]]
            assert shown == want[i].tolist()
            for j, x in enumerate(cells[1:C + 1]):
                assert x.startswith("✓") == (i == j and want[i, j] > 0)
                assert x.startswith("✗") == (i != j and want[i, j] > 0)
            assert cells[C + 1] == str(want[i].sum())
    assert {"confusion-ensemble.png", "confusion-knn.png"} <= set(parse(index).imgs)


def test_kernel_values_and_sample_match_numpy(small_kernel, small_report):
    d = small_kernel
    index, data = small_report
    with np.load(d / "sim" / "labels.npz") as z:
        y_train, y_test = z["train"], z["test"]
    K = read_kernel(d / "kernel")
    kv = data["kernel_values"]
    # the top neighbours the k-NN reads: 50 per test example (the largest k of the grid)
    k = kv["neighbours_k"]
    assert k == 50
    top = top_columns(K, k)
    vals = np.take_along_axis(K, top, axis=1).astype(np.float64)
    same = y_train[top] == y_test[:, None]
    for key, mask in (("same", same), ("different", ~same)):
        assert kv["neighbours"][key]["count"] == int(mask.sum())
        assert kv["neighbours"][key]["mean"] == pytest.approx(vals[mask].mean(), rel=1e-5)
        assert kv["neighbours"][key]["median"] == pytest.approx(np.median(vals[mask]),
                                                                rel=1e-5)
    # the sample: class-sorted, its entries the kernel's
    smp = data["kernel_sample"]
    rows, cols = np.array(smp["rows"]), np.array(smp["cols"])
    assert smp["seed"] == 0 and smp["classes"] == list(range(10))
    for idx, lab in ((rows, y_test), (cols, y_train)):
        assert len(set(idx.tolist())) == idx.size
        assert np.array_equal(np.lexsort((idx, lab[idx])), np.arange(idx.size))
    per_r, per_c = 200 // 10, 400 // 10
    assert np.array_equal(np.bincount(y_test[rows], minlength=10),
                          np.minimum(np.bincount(y_test, minlength=10), per_r))
    assert np.array_equal(np.bincount(y_train[cols], minlength=10),
                          np.minimum(np.bincount(y_train, minlength=10), per_c))
    block = K[np.ix_(rows, cols)].astype(np.float64)
    same = y_test[rows][:, None] == y_train[cols][None, :]
    for key, mask in (("same", same), ("different", ~same)):
        assert kv["sample"][key]["count"] == int(mask.sum())
        assert kv["sample"][key]["mean"] == pytest.approx(block[mask].mean(), rel=1e-5,
                                                          abs=1e-9)
    html = index.read_text(encoding="utf-8")
    table = Rows(section(html, "kernel-values")).tables[0]
    assert [r[1][2] for r in table] == [str(kv[src][g]["count"]) for src in
                                        ("neighbours", "sample") for g in ("same", "different")]
    assert "kernel-heatmap.png" in parse(index).imgs and "kernel-values.png" in parse(index).imgs


def test_read_entries_reads_what_zarr_reads(small_kernel):
    from kernelscale.kernelread import load_kernel
    from kernelscale.report_data import read_entries

    K = read_kernel(small_kernel / "kernel")
    kern = load_kernel(small_kernel / "kernel")
    rng = np.random.default_rng(4)
    rows = rng.integers(0, K.shape[0], 23)  # unsorted, with repeats
    cols = rng.integers(0, K.shape[1], 41)
    assert np.array_equal(read_entries(kern, rows, cols), K[np.ix_(rows, cols)])


def test_sample_indices_are_class_sorted_and_seeded():
    from kernelscale.report_data import CLASS_ROWS, sample_indices

    rng = np.random.default_rng(0)
    C = 30
    y_train = rng.integers(0, C, 3000)
    y_test = rng.integers(0, C - 1, 600)  # the last class has no test example
    r, c, shown = sample_indices(y_train, y_test, C, seed=7)
    assert shown.size == CLASS_ROWS and C - 1 not in shown.tolist()
    assert set(y_test[r].tolist()) == set(shown.tolist()) == set(y_train[c].tolist())
    assert np.array_equal(np.lexsort((r, y_test[r])), np.arange(r.size))
    assert np.array_equal(np.lexsort((c, y_train[c])), np.arange(c.size))
    assert np.bincount(y_train[c]).max() <= 400 // CLASS_ROWS
    again = sample_indices(y_train, y_test, C, seed=7)
    other = sample_indices(y_train, y_test, C, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip((r, c, shown), again, strict=True))
    assert not np.array_equal(r, other[0])


# ------------------------------------------------------------------ the headline row

def evaluation_with(loo: float | None):
    """An Evaluation with a cross-fit (84.00%) and, unless ``loo`` is None, a
    leave-one-out selection (82.50% on test) that reached ``loo`` % on the train rows."""
    from kernelscale.evaluation import Evaluation
    from kernelscale.knn import Choice, Fold, Selection, Setting

    cf = Selection("cross-fit", None, 84.0, folds=(Fold(Setting(3), 40, 86.0, 40, 83.0),
                                                   Fold(Setting(7, "power", 2.0), 40, 88.0,
                                                        40, 85.0)), seed=0)
    sel = cf if loo is None else Selection("leave-one-out", Setting(5, "softmax", 0.1), 82.5,
                                           selection_accuracy=loo, selection_rows=300)
    return Evaluation(30, 3, 70.0, 80.0, 81.0, {}, setting=Setting(3),
                      weighted_accuracy=81.0, selection=sel, crossfit=cf,
                      oracle=Choice(Setting(6), 86.5))


@pytest.mark.parametrize("loo, want", [(98.99, "leave-one-out"), (99.0, "cross-fit"),
                                       (100.0, "cross-fit"), (None, "cross-fit")])
def test_headline_row_is_the_honest_choice(loo, want):
    from kernelscale.report_data import headline
    from kernelscale.report_sections import knn_section, summary_section

    ev = evaluation_with(loo)
    head = headline(ev)
    assert head.selection.method == want
    acc = {"leave-one-out": "82.50", "cross-fit": "84.00"}[want]
    knn = Rows(knn_section(ev, head))
    for rows in (knn.tables[0], Rows(summary_section(ev, head)).tables[0]):
        assert [r[0] for r in rows] == ["hl"] + [""] * (len(rows) - 1)  # one highlighted
        assert rows[0][1][1] == acc and "headline" in rows[0][1][2]
    body = knn.tables[0]
    flagged = loo is not None and loo >= 99.0
    if loo is not None:  # both selections listed, the other one after the headline
        other = [r for r in body[1:] if r[1][1] in ("82.50", "84.00")]
        assert len(other) == 1 and ("poor" in other[0][1][2]) == flagged
    text = knn_section(ev, head)
    assert ("is the headline row" in text) == flagged
    # the cross-fit cells explained: one row per half, the settings and both accuracies
    halves = knn.tables[1]
    assert [r[1][:2] for r in halves] == [["half 1", "k=3, majority vote"],
                                          ["half 2", "k=7, power p=2"]]
    assert [r[1][3] for r in halves] == ["86.00", "88.00"]  # where chosen: optimistic
    assert [r[1][6] for r in halves] == ["83.00", "85.00"]  # on the other half: honest
    assert "k=3, majority vote / k=7, power p=2" in text


# -------------------------------------------------------- top-K kernel and comparison

@pytest.fixture(scope="module")
def topk_kernel(small_kernel):
    from kernelscale.kernel import KernelConfig, compute_kernel

    compute_kernel(KernelConfig(store=small_kernel / "store", out=small_kernel / "ktop",
                                device="cpu", topk=50, show_progress=False))
    return small_kernel / "ktop"


def test_top_k_kernel_report_has_no_heatmap(tmp_path, small_kernel, topk_kernel,
                                            small_report):
    from kernelscale.report import ReportConfig, build_report

    d = small_kernel
    index = build_report(ReportConfig(store=d / "store", kernel=topk_kernel,
                                      labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r"))
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["kernel_sample"] is None and "sample" not in data["kernel_values"]
    assert not (tmp_path / "r" / "kernel-heatmap.png").exists()
    html = index.read_text(encoding="utf-8")
    assert "No heatmap: the kernel is a top-50 kernel" in section(html, "heatmap")
    # the top-50 neighbours are those of the full kernel
    full = small_report[1]["kernel_values"]["neighbours"]
    assert data["kernel_values"]["neighbours"] == full
    check_images(parse(index), tmp_path / "r")


def test_compare_section_shows_compare_json(tmp_path, small_kernel, topk_kernel):
    from kernelscale.compare import compare_kernels, write_comparison
    from kernelscale.labels import load_labels
    from kernelscale.report import ReportConfig, build_report

    d = small_kernel
    labels = load_labels(str(d / "sim" / "labels.npz"))
    src, fig = write_comparison(compare_kernels(d / "kernel", topk_kernel, labels=labels,
                                                k=5), tmp_path / "cmp")
    doc = json.loads(src.read_text())
    index = build_report(ReportConfig(store=d / "store", kernel=d / "kernel",
                                      labels=str(d / "sim" / "labels.npz"), out=tmp_path / "r",
                                      compare=tmp_path / "cmp"))
    out = tmp_path / "r"
    assert (out / "compare.json").read_bytes() == src.read_bytes()
    assert (out / "compare.png").read_bytes() == fig.read_bytes()
    page = parse(index)
    assert "compare.json" in page.links and "compare.png" in page.imgs
    html = index.read_text(encoding="utf-8")
    sec = section(html, "compare")
    kn = doc["knn"]
    assert (f"A {kn['accuracy_a']:.2f}%, B {kn['accuracy_b']:.2f}%; predictions agree on "
            f"{kn['agreement']:.2f}%") in " ".join(sec.split())
    overlap = Rows(sec).tables[1]
    assert [r[1][:2] for r in overlap] == [[str(o["k"]), f"{o['mean_jaccard']:.3f}"]
                                           for o in doc["overlap"]]
    assert d.joinpath("ktop").as_posix() in sec
    data = json.loads((out / "report.json").read_text())
    assert data["compare"] == {"source": str(src), "file": "compare.json"}
    assert "compare.json" in data["files"]


# ------------------------------------------------------------------- the page itself

def test_page_structure_for_narrow_screens(small_kernel, small_report):
    from kernelscale.report_html import CSS

    index, data = small_report
    html = index.read_text(encoding="utf-8")
    page = parse(index)
    assert page.tables > 10 and all(page.wrapped), page.wrapped  # every table scrolls
    css = "".join(CSS.split())
    assert ".scroll{overflow-x:auto" in css and "@media(max-width:800px)" in css
    assert '<meta name="viewport" content="width=device-width,initial-scale=1">' in html
    assert "<style>" in html and page.assets == []
    # right and wrong: a symbol beside the colour, in every neighbour table
    nbr = re.findall(r'<span class="(good|bad)">(.)', html)
    assert nbr and all(mark == ("✓" if cls == "good" else "✗") for cls, mark in nbr)
    # links to the JSON files, present beside index.html
    files = {h for h in page.links if not h.startswith("#")}
    assert files == JSON_LINKS
    assert all((index.parent / f).is_file() for f in files)
    # class names and where they came from
    labels = small_kernel / "sim" / "labels.npz"
    prov = section(html, "provenance")
    assert f"the class_names array of the labels file {labels}" in prov
    assert data["class_names_source"].endswith(str(labels))
    # the command, versions, device and times
    run = " ".join(section(html, "run").split())
    p = data["provenance"]
    assert escape(p["command"]) in run and f"torch {p['torch_version']}" in run
    assert "kernel computed on</th><td>cpu" in run
    done = [json.loads(f.read_text())["finished_at"]
            for f in (small_kernel / "kernel" / ".done").glob("*.json")]
    assert min(done) in run
    timings = json.loads((index.parent / "timings.json").read_text())
    assert set(timings["report_seconds"]) == {"evaluation", "views and kernel sample",
                                              "figures", "total"}
    assert timings["evaluated_at"] == p["created_at"] and timings["curve_kernels"] == []


def test_same_inputs_give_the_same_page(tmp_path, small_kernel, small_report):
    """Run times live in timings.json: a rebuild's page (but for the minute it was written)
    and report.json (but for the evaluation's time) are the first build's."""
    from kernelscale.report import ReportConfig, build_report

    index, data = small_report
    again = build_report(ReportConfig(store=small_kernel / "store",
                                      kernel=small_kernel / "kernel",
                                      labels=str(small_kernel / "sim" / "labels.npz"),
                                      out=tmp_path / "r"))

    def page(p: Path) -> str:
        text = p.read_text(encoding="utf-8").replace(str(p.parent), "OUT")
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "TIME", text)

    assert page(again) == page(index)
    second = json.loads((tmp_path / "r" / "report.json").read_text())
    for d in (data, second):
        d["provenance"].pop("created_at")
    assert second == data
