"""``kernelscale publish`` and ``hf://`` kernels against the local Hub server
(tests/hubserver.py), which keeps what is committed so that the served repository can be
read back; no network.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it
is imported, so in-process calls pass ``endpoint=`` and patch the library's constants;
command-line runs get the variables in their environment (as in tests/test_hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kernelscale.errors import BadInputError, KernelOutputError
from kernelscale.publish import PublishConfig, publish
from kernelscale.sources.hub import HubError
from tests.conftest import ROOT, ingest_dir, run_cli
from tests.hubserver import HubServer, private_hf_home
from tests.reference import knn_predict, labels_file, random_source, reference_kernel

REPO = "me/kernels"
TARGET = f"hf://datasets/{REPO}"
TOKEN = "hf_WRITEtokenNeverToBeSeen0123456789"
READ_ONLY = "hf_READtokenNeverToBeSeen9876543210"


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """A private HF home, Xet off (plain LFS uploads), offline mode off, no token."""
    return private_hf_home(tmp_path, monkeypatch, cache=True)


@pytest.fixture
def hub():
    with HubServer(page_size=7) as server:
        yield server


def make_job(wd: Path, runs: list[int], seed: int = 0, topk: bool = True):
    """A job's workdir: its source files, store, a full (and a top-K) kernel, labels and
    results.json; returns (workdir, test logits, train logits)."""
    from kernelscale.evaluation import evaluate
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.labels import load_labels

    test, train = random_source(wd / "src", runs, seed=seed)
    ingest_dir(wd / "src", wd / "store", run_chunk=4, show_progress=False)
    for out, k in (("kernel", None), ("kernel-top", 5))[:2 if topk else 1]:
        compute_kernel(KernelConfig(store=wd / "store", out=wd / out, device="cpu",
                                    chunks=(16, 32), topk=k, show_progress=False))
    lab = load_labels(str(labels_file(wd / "labels.npz", 96, 40, 5)))
    ev = evaluate(str(wd / "store"), str(wd / "kernel"), lab, k=3, select=True)
    (wd / "results.json").write_text(json.dumps(ev.as_json(), indent=1))
    return wd, test, train


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("job"), [7, 8, 9])


def env(hub_server: HubServer, home: Path, **extra: str) -> dict:
    return {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def pub(hub_server: HubServer, path: Path, target: str = TARGET, **kw):
    token = kw.pop("token", TOKEN)
    cfg = PublishConfig(Path(path), target, show_progress=False, **kw)
    return publish(cfg, endpoint=hub_server.url, token=token)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_kernel_files(kernel: Path, into: str) -> dict[str, bytes]:
    """What a kernel folder must put in the repo, listed here from the format: the group's
    zarr.json, each array's zarr.json and chunk files, the done-markers."""
    out = {f"{into}/zarr.json": (kernel / "zarr.json").read_bytes()}
    for arr in ("kernel", "values", "indices"):
        if (kernel / arr).is_dir():
            out[f"{into}/{arr}/zarr.json"] = (kernel / arr / "zarr.json").read_bytes()
            for c in (kernel / arr / "c").rglob("*"):
                rel = c.relative_to(kernel / arr).as_posix()
                if c.is_file() and re.fullmatch(r"c(/[0-9]+)+", rel):
                    out[f"{into}/{arr}/{rel}"] = c.read_bytes()
    for m in (kernel / ".done").glob("*.json"):
        out[f"{into}/.done/{m.name}"] = m.read_bytes()
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---", 4)])


def writes(hub_server: HubServer, since: int = 0) -> list[dict]:
    return [r for r in hub_server.requests()[since:] if r["method"] in ("POST", "PUT")]


# ------------------------------------------------------------------------- publishing

def test_workdir_uploads_its_outputs_not_store_sources_locks_or_temps(hub, job, tmp_path):
    wd0, _, _ = job
    wd = tmp_path / "wd"
    shutil.copytree(wd0, wd)
    # what a run leaves that must never go up, and a secret a user keeps beside it
    (wd / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (wd / "kernel" / ".checkpoints").mkdir()
    (wd / "kernel" / ".checkpoints" / "pass-0.npz").write_bytes(b"accumulators")
    (wd / ".results.json.ab12cd.tmp").write_text("{")
    (wd / "kernel" / "kernel" / "c" / "0" / "0.incomplete").write_bytes(b"x")
    s = pub(hub, wd, create=True)

    served = hub.files(REPO)
    want = {**expected_kernel_files(wd / "kernel", "kernel"),
            **expected_kernel_files(wd / "kernel-top", "kernel-top"),
            "results.json": (wd / "results.json").read_bytes(),
            "labels.npz": (wd / "labels.npz").read_bytes()}
    generated = {"README.md", "kernelscale-provenance.json", "kernelscale-published.json",
                 ".gitattributes"}
    assert set(served) - generated == set(want)
    for path, data in want.items():
        assert served[path] == data, path
    assert s.commit == hub.repos[REPO].refs["main"] and len(s.uploaded) == len(want) + 3
    # binary chunks went the large-file way: one PUT per distinct content, then committed
    head = hub.repos[REPO].commits[s.commit]
    chunks = {p for p in want if "/c/" in p}
    assert all(head[p].lfs for p in chunks) and not head["kernel/zarr.json"].lfs
    puts = {r["path"].rsplit("/", 1)[1] for r in hub.requests("PUT")}
    assert puts == {sha256(want[p]) for p in chunks} | {sha256(want["labels.npz"])}
    assert any("store (the logits); not uploaded" in n for n in s.notes)
    assert any("ingested from; not uploaded" in n for n in s.notes)

    card = served["README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "other" and "kernelscale" in meta["tags"]
    assert meta["size_categories"] == ["n<1K"]  # 40 rows
    ev = json.loads((wd / "results.json").read_text())
    assert f"| {ev['knn_accuracy']:.2f} |" in card
    assert f"| {ev['ensemble_accuracy']:.2f} |" in card
    src = sorted((wd / "src").rglob("log.pt"))
    prov = json.loads(served["kernelscale-provenance.json"])
    (store,) = prov["stores"].values()
    assert store["sources"] == [{"kind": "local", "folder": "src"}]  # no local path
    assert {f["name"]: f["sha256"] for f in store["files"]} == {
        p.relative_to(wd / "src").as_posix(): sha256(p.read_bytes()) for p in src}
    for p in src:
        assert sha256(p.read_bytes()) in card
    assert "precision `fp32`" in card and "torch" in card


def test_republishing_the_same_content_writes_nothing(hub, job, tmp_path):
    wd0, _, _ = job
    wd = tmp_path / "wd"
    shutil.copytree(wd0, wd)
    first = pub(hub, wd, create=True)
    n = len(hub.requests())
    again = pub(hub, wd, create=True)
    assert again.uploaded == [] and again.commit is None
    assert again.unchanged == len(first.uploaded)
    assert writes(hub, n) == []
    assert "up to date" in again.line()

    # one changed file: only it (and the card, whose table shows it, and the record) is
    # committed
    ev = json.loads((wd / "results.json").read_text())
    ev["knn_accuracy"] = 99.5
    (wd / "results.json").write_text(json.dumps(ev))
    before = hub.repos[REPO].refs["main"]
    third = pub(hub, wd)
    changed = ["README.md", "kernelscale-provenance.json", "kernelscale-published.json",
               "results.json"]
    assert sorted(f.path_in_repo for f in third.uploaded) == changed
    served = hub.files(REPO)
    assert json.loads(served["results.json"])["knn_accuracy"] == 99.5
    assert "| 99.50 |" in served["README.md"].decode()
    old = hub.files(REPO, before)
    assert sorted(p for p in served if served[p] != old.get(p)) == changed


def test_configurations_published_one_by_one_share_one_card(hub, job, tmp_path):
    """Two configurations' workdirs into two folders: the card describes both (each
    accuracy table, each store's files), and publishing either again writes nothing."""
    wd_a, _, _ = job
    wd_b, _, _ = make_job(tmp_path / "b", [6, 6], seed=7, topk=False)
    pub(hub, wd_a, f"{TARGET}/cfg-a", create=True)
    pub(hub, wd_b, f"{TARGET}/cfg-b")
    card = hub.files(REPO)["README.md"].decode()
    for wd, folder in ((wd_a, "cfg-a"), (wd_b, "cfg-b")):
        ev = json.loads((wd / "results.json").read_text())
        table = card[card.index(f"### `{folder}/results.json`"):]
        assert f"| ensemble ({ev['runs']} runs) | {ev['ensemble_accuracy']:.2f} |" in table
        assert f"### `{folder}/kernel`" in card
        for f in (wd / "src").rglob("log.pt"):
            assert sha256(f.read_bytes()) in card
    n = len(hub.requests())
    for wd, folder in ((wd_a, "cfg-a"), (wd_b, "cfg-b")):
        assert pub(hub, wd, f"{TARGET}/{folder}").uploaded == []
    assert writes(hub, n) == []


def test_a_kernel_keeps_its_name_in_a_folder_and_a_branch(hub, job):
    wd, _, _ = job
    s = pub(hub, wd / "kernel-top", f"{TARGET}@cfg-a/configs/a", create=True,
            message="top-K of configuration a")
    repo = hub.repos[REPO]
    assert set(repo.refs) == {"main", "cfg-a"} and s.commit == repo.refs["cfg-a"]
    assert repo.messages[s.commit] == "top-K of configuration a"
    on_branch = hub.files(REPO, "cfg-a")
    want = expected_kernel_files(wd / "kernel-top", "configs/a/kernel-top")
    assert {p: on_branch[p] for p in want} == want
    assert not any(p.startswith("configs/") for p in hub.files(REPO, "main"))
    card = on_branch["README.md"].decode()
    assert "hf://datasets/me/kernels@cfg-a/configs/a/kernel-top" in card
    assert 'revision="cfg-a"' in card and "top-5 kernel" in card


def test_private_creation_and_refusal_to_publish_privately_into_a_public_repo(hub, job):
    wd, _, _ = job
    pub(hub, wd / "results.json", "hf://datasets/me/private", create=True, private=True)
    assert hub.repos["me/private"].private
    assert "results.json" in hub.files("me/private")
    pub(hub, wd / "results.json", create=True)
    n = len(hub.requests())
    with pytest.raises(HubError, match="exists and is public; --private refuses"):
        pub(hub, wd / "kernel", private=True)
    assert writes(hub, n) == []


def test_missing_repo_without_create_and_dry_run(hub, job):
    wd, _, _ = job
    with pytest.raises(HubError, match="repository not found.*--create"):
        pub(hub, wd / "kernel")
    s = pub(hub, wd / "kernel", create=True, dry_run=True)
    assert REPO not in hub.repos and writes(hub) == []
    assert len(s.uploaded) == len(expected_kernel_files(wd / "kernel", "kernel")) + 3
    assert "dry run" in s.line()


def test_damaged_or_unfinished_kernel_is_not_published(hub, job, tmp_path):
    import zarr

    wd, _, _ = job
    bad = tmp_path / "kernel"
    shutil.copytree(wd / "kernel", bad)
    chunk = bad / "kernel" / "c" / "1" / "2"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=r"kernel/c/1/2.*not published"):
        pub(hub, bad, create=True)
    chunk.write_bytes((wd / "kernel" / "kernel" / "c" / "1" / "2").read_bytes())
    zarr.open_group(str(bad), mode="r+").attrs["complete"] = False
    with pytest.raises(BadInputError, match="not complete"):
        pub(hub, bad, create=True)
    assert writes(hub) == [] and REPO not in hub.repos


def test_a_readme_kernelscale_did_not_write_is_kept(hub, job, tmp_path):
    wd, _, _ = job
    mine = tmp_path / "theirs"
    mine.mkdir()
    (mine / "README.md").write_text("# Their own card\n")
    hub.add_commit(REPO, mine)
    s = pub(hub, wd / "kernel")
    served = hub.files(REPO)
    assert served["README.md"] == b"# Their own card\n"
    assert "kernel/zarr.json" in served
    assert any("not written by kernelscale; kept" in n for n in s.notes)


# ---------------------------------------------------------------------- command line

def test_cli_publish_sends_the_token_and_never_shows_or_stores_it(hub, job, tmp_path, hf_env):
    wd, _, _ = job
    hub.token = TOKEN
    p = run_cli("publish", str(wd / "kernel"), TARGET, "--create",
                env=env(hub, hf_env, HF_TOKEN=TOKEN))
    assert "uploaded" in p.stdout and TOKEN not in p.stdout + p.stderr
    auths = {r["auth"] for r in hub.requests() if not r["path"].startswith("/lfs-upload/")}
    assert auths == {f"Bearer {TOKEN}"}
    assert {r["auth"] for r in hub.requests("PUT")} == {None}  # a presigned-style URL
    again = run_cli("publish", str(wd / "kernel"), TARGET, env=env(hub, hf_env,
                                                                   HF_TOKEN=TOKEN))
    assert "up to date" in again.stdout
    for root in (wd, hf_env):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert TOKEN.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("token, status, why", [
    (READ_ONLY, 403, "the token lacks write access"),
    (None, 401, "no valid token was sent"),
])
def test_cli_refused_write_is_one_line_naming_the_repo(hub, job, hf_env, token, status, why):
    wd, _, _ = job
    pub(hub, wd / "results.json", create=True)  # the repo exists, with other content
    hub.read_only_tokens.add(READ_ONLY)
    extra = {"HF_TOKEN": token} if token else {}
    p = run_cli("publish", str(wd / "kernel"), TARGET, env=env(hub, hf_env, **extra),
                check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"kernelscale: error: {TARGET}: HTTP {status}: {why}")
    assert READ_ONLY not in p.stdout + p.stderr
    assert "kernel/zarr.json" not in hub.files(REPO)


# --------------------------------------------------------------------- hf:// kernels

def test_open_kernel_from_the_hub_is_the_local_kernel(hub, job, hf_env):
    import kernelscale
    from kernelscale.kernelread import kernel_neighbours, load_kernel

    wd, test, train = job
    pub(hub, wd / "kernel", f"{TARGET}/cfg", create=True)
    pub(hub, wd / "kernel-top", f"{TARGET}/cfg")
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", hub.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                   hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        view = kernelscale.open_kernel(f"{TARGET}/cfg/kernel")
        top = kernelscale.open_kernel(f"{TARGET}@main/cfg/kernel-top")
    assert Path(hf_env) in view.path.parents  # in the Hub cache
    got = view.numpy()
    np.testing.assert_array_equal(got, load_kernel(wd / "kernel").array[...])
    np.testing.assert_allclose(got, reference_kernel(test, train), atol=2e-5)
    nb, ref = top.neighbours(), kernel_neighbours(load_kernel(wd / "kernel-top"), 5)
    np.testing.assert_array_equal(nb.index, ref.index)
    np.testing.assert_array_equal(nb.values, ref.values)
    assert not any("/.lock" in r["path"] or "checkpoints" in r["path"]
                   for r in hub.requests())


def test_a_damaged_download_is_refused(hub, job):
    from kernelscale.hubkernel import fetch_kernel

    wd, _, _ = job
    pub(hub, wd / "kernel", create=True)
    hub.fault("kernel/kernel/c/2/1", "corrupt", times=0)
    with pytest.raises(KernelOutputError, match=r"fails verification: kernel/c/2/1: .*"
                       r"(checksum|CRC)"):
        fetch_kernel(f"{TARGET}/kernel", endpoint=hub.url, quiet=True)
    with pytest.raises(KernelOutputError, match="no kernel there"):
        fetch_kernel(f"{TARGET}/nothing", endpoint=hub.url, quiet=True)


def test_cli_evaluate_a_hub_kernel_matches_the_local_one_and_the_reference(hub, job, hf_env):
    wd, test, train = job
    pub(hub, wd / "kernel", create=True)
    args = ("evaluate", "--store", str(wd / "store"), "--labels", str(wd / "labels.npz"),
            "--k", "3", "--json")
    remote = json.loads(run_cli(*args, "--kernel", f"{TARGET}/kernel",
                                env=env(hub, hf_env)).stdout)
    local = json.loads(run_cli(*args, "--kernel", str(wd / "kernel")).stdout)
    for key in ("knn_accuracy", "ensemble_accuracy", "single_model_accuracy", "runs"):
        assert remote[key] == local[key], key
    # the k-NN accuracy from the float64 formula and the published code's vote
    y = np.load(wd / "labels.npz")
    idx = np.argsort(-reference_kernel(test, train), axis=1, kind="stable")[:, :3]
    ref = 100.0 * float(np.mean(knn_predict(idx, y["train"]) == y["test"]))
    assert remote["knn_accuracy"] == pytest.approx(ref)


def test_the_cards_loading_snippets_run(hub, job, hf_env, tmp_path):
    """The card's Python blocks (kernelscale, zarr, xarray), run as a reader would."""
    wd, test, train = job
    pub(hub, wd / "kernel", create=True)
    card = hub.files(REPO)["README.md"].decode()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 3
    script = "\n".join(blocks) + (
        "\nimport numpy as np\n"
        "np.save('k-api.npy', K); np.save('k-zarr.npy', arrays)\n"
        "np.save('k-xr.npy', ds['kernel'].values)\n"
        "assert ds['kernel'].dims == ('test', 'train'), ds['kernel'].dims\n"
        "assert identity['runs'] == 24\n")
    (tmp_path / "snippets.py").write_text(script)
    e = {**os.environ, **env(hub, hf_env), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "snippets.py"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    want = reference_kernel(test, train)
    for name in ("k-api.npy", "k-zarr.npy", "k-xr.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), want, atol=2e-5)


def test_the_card_names_the_hub_source_and_its_commit(hub, tmp_path):
    """A store ingested from the Hub: the card names the source repo, the commit and each
    file's sha256 (checked against the files' own bytes)."""
    from kernelscale.ingestion import IngestConfig, ingest
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.sources import FetchOptions

    random_source(tmp_path / "logs", [5, 6], seed=3)
    commit = hub.add_commit("local/sim", tmp_path / "logs")
    store, kernel = tmp_path / "store", tmp_path / "kernel"
    ingest(IngestConfig("hf://datasets/local/sim", store, show_progress=False,
                        fetch=FetchOptions(download_workers=1, cache_dir=tmp_path / "cache")),
           endpoint=hub.url, retry_wait=0.01)
    compute_kernel(KernelConfig(store=store, out=kernel, device="cpu", show_progress=False))
    pub(hub, kernel, create=True)
    card = hub.files(REPO)["README.md"].decode()
    assert f"`hf://datasets/local/sim` at commit `{commit}` (revision `main`)" in card
    prov = json.loads(hub.files(REPO)["kernelscale-provenance.json"])
    (st,) = prov["stores"].values()
    logs = {p.relative_to(tmp_path / "logs").as_posix(): sha256(p.read_bytes())
            for p in (tmp_path / "logs").rglob("log.pt")}
    assert {f["name"]: f["sha256"] for f in st["files"]} == logs
    assert {f["commit"] for f in st["files"]} == {commit}
    assert st["sources"][0]["kind"] == "hub" and st["sources"][0]["commit"] == commit
    for name, digest in logs.items():
        assert f"| `{name}` |" in card and digest in card


def test_a_report_folder_keeps_its_name_and_is_on_the_card(hub, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<html><body>report</body></html>\n")
    (report / "report.json").write_text("{}\n")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    (report / "kernel-values.png").write_bytes(png)
    pub(hub, report, f"{TARGET}/cfg", create=True)
    served = hub.files(REPO)
    assert served["cfg/report/kernel-values.png"] == png
    assert served["cfg/report/index.html"] == (report / "index.html").read_bytes()
    sha = hub.repos[REPO].refs["main"]
    assert hub.repos[REPO].commits[sha]["cfg/report/kernel-values.png"].lfs
    card = served["README.md"].decode()
    assert "| `cfg/` | `cfg/report`: HTML report" in card
    assert "size_categories" not in front_matter(card) and "## Loading" not in card


def test_a_commit_landing_meanwhile_is_not_overwritten(hub, job, tmp_path, monkeypatch):
    """The commit is made on top of the commit that was compared: another one landing in
    between makes it fail (412) with one line, and the other commit stays the head."""
    import kernelscale.publish as publish_mod

    wd, _, _ = job
    pub(hub, wd / "results.json", create=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"theirs": true}\n')
    listed = publish_mod._remote

    def racing(*args, **kw):
        out = listed(*args, **kw)
        hub.add_commit(REPO, theirs)
        return out

    monkeypatch.setattr(publish_mod, "_remote", racing)
    with pytest.raises(HubError, match="HTTP 412: the branch moved while publishing"):
        pub(hub, wd / "kernel")
    served = hub.files(REPO)
    assert served["results.json"] == b'{"theirs": true}\n' and "kernel/zarr.json" not in served
