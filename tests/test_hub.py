"""The Hub source against a local Hub-protocol server (tests/hubserver.py); no network.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it
is imported, so in-process tests pass ``endpoint=``/``cache_dir=`` explicitly and patch
the library's constants; subprocess tests get the variables in their environment.
"""

import hashlib
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import kernelscale.sources.hub as hubmod
from kernelscale.errors import BadInputError, ConfigError
from kernelscale.ingestion import IngestConfig
from kernelscale.ingestion import ingest as run_ingest
from kernelscale.sources import FetchOptions
from kernelscale.sources.hub import HubError
from kernelscale.sources.hubspec import glob_regex, parse_hub_spec
from kernelscale.store import Store
from tests.conftest import ROOT, ingest_dir, run_cli
from tests.hubserver import HubServer, private_hf_home
from tests.reference import write_log

REPO = "local/sim"
SPEC = f"hf://datasets/{REPO}"
TOKEN = "hf_TESTtokenNeverToBeSeen0123456789"


class _SleepGuard:
    """Stands for the ``time`` module inside huggingface_hub: a test may let the client
    sleep (its own backoff) at most ``limit`` seconds in all, so none can sit through the
    ~23 s of retries the client spends on a dead endpoint."""

    def __init__(self, limit: float = 3.0) -> None:
        self.limit, self.total = limit, 0.0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.total += seconds
        if self.total > self.limit:
            raise RuntimeError(f"huggingface_hub would sleep {self.total:.0f} s on retries")
        time.sleep(seconds)


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """A private HF home, Xet off, offline mode off, no token unless a test sets one,
    and a cap on the client's own retry sleeping."""
    import huggingface_hub.file_download
    import huggingface_hub.utils._http

    guard = _SleepGuard()
    monkeypatch.setattr(huggingface_hub.utils._http, "time", guard)
    monkeypatch.setattr(huggingface_hub.file_download, "time", guard)

    return private_hf_home(tmp_path, monkeypatch)


@pytest.fixture
def hub():
    with HubServer(page_size=3) as server:
        yield server


def write_files(root: Path, runs: dict[str, int], seed: int = 0, n_test: int = 30,
                n_train: int = 70, classes: int = 5) -> dict[str, tuple]:
    """Write ``log.pt`` files named by their path under ``root``; return the logits."""
    rng = np.random.default_rng(seed)
    base_te, base_tr = rng.normal(size=(n_test, classes)), rng.normal(size=(n_train, classes))
    out = {}
    for name, r in runs.items():
        te = (base_te + rng.normal(size=(r, n_test, classes))).astype(np.float16)
        tr = (base_tr + rng.normal(size=(r, n_train, classes))).astype(np.float16)
        write_log(root / name, te, tr)
        out[name] = (te, tr)
    return out


FILES_A = {f"logs_saveoutputs_main/run{i:02d}/log.pt": r for i, r in enumerate([4, 6, 3, 5, 7])}


FETCH = ("revision", "retries", "keep_downloads", "cache_dir")


def ingest_hub(spec, store, *, endpoint=None, retry_wait=1.0, workers=4, **kw):
    """Ingest ``spec`` into ``store``: ``kw`` holds IngestConfig and FetchOptions fields."""
    fetch = FetchOptions(download_workers=workers, **{k: kw.pop(k) for k in FETCH if k in kw})
    return run_ingest(IngestConfig(spec, store, fetch=fetch, **kw), endpoint=endpoint,
                      retry_wait=retry_wait)


def ingest(hub_server, store, tmp_path, **kw):
    kw = {"endpoint": hub_server.url, "cache_dir": tmp_path / "cache", "workers": 2,
          "retry_wait": 0.01, "show_progress": False, **kw}
    spec = kw.pop("spec", SPEC)
    return ingest_hub(spec, store, **kw)


def kernel_of(store: Path, out: Path) -> np.ndarray:
    from kernelscale.kernel import KernelConfig, compute_kernel
    from kernelscale.kernelread import load_kernel

    compute_kernel(KernelConfig(store=store, out=out, device="cpu", show_progress=False))
    return load_kernel(out).array[...]


def snapshot(store: Path) -> dict:
    s = Store.open(store)
    return {"names": [f["name"] for f in s.manifest["files"]],
            "sha256": [f["sha256"] for f in s.manifest["files"]],
            "test": s.read("test", 0, s.runs), "train": s.read("train", 0, s.runs)}


def download_dir_bytes(cache: Path) -> int:
    """Bytes of regular files (blobs, partial downloads) under the repo's cache folder."""
    total = 0
    for dirpath, _, names in os.walk(cache / "datasets--local--sim"):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if not os.path.islink(os.path.join(dirpath, n)):
                total += st.st_size
    return total


# --------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,repo,rev,prefix", [
    ("hf://datasets/kjj0/cifar10-multirun-logits", "kjj0/cifar10-multirun-logits", None, ""),
    ("hf://datasets/kjj0/cifar10-multirun-logits/logs_saveoutputs_main/",
     "kjj0/cifar10-multirun-logits", None, "logs_saveoutputs_main"),
    ("hf://datasets/a/b@v1.0/x/y", "a/b", "v1.0", "x/y"),
    ("hf://datasets/a/b@refs%2Fpr%2F3", "a/b", "refs/pr/3", ""),
])
def test_parse_hub_spec(text, repo, rev, prefix):
    s = parse_hub_spec(text)
    assert (s.repo_id, s.revision, s.prefix) == (repo, rev, prefix)
    assert parse_hub_spec(str(s)) == s


@pytest.mark.parametrize("text", ["hf://models/a/b", "hf://datasets/a", "hf://datasets/a/b@",
                                  "hf://datasets/a/b/../c", "hf://datasets/a b/c"])
def test_parse_hub_spec_rejects(text):
    with pytest.raises(ConfigError):
        parse_hub_spec(text)


@pytest.mark.parametrize("pattern,path,hit", [
    ("**/log.pt", "log.pt", True),
    ("**/log.pt", "a/b/log.pt", True),
    ("**/log.pt", "a/b/log.pt.bak", False),
    ("*/log.pt", "a/b/log.pt", False),
    ("a/*/log.pt", "a/b/log.pt", True),
    ("a/b?/log.pt", "a/bc/log.pt", True),
    ("a/[!x]*/log.pt", "a/xyz/log.pt", False),
    ("r[0-3]/log.pt", "r2/log.pt", True),
    ("r[0-3]/log.pt", "r-/log.pt", False),
    ("r[^a]/log.pt", "r^/log.pt", True),
    ("logs/0610.pt", "logs/0610Xpt", False),
])
def test_glob_regex(pattern, path, hit):
    assert bool(glob_regex(pattern).match(path)) is hit


# ------------------------------------------------------------------- ingest results

def test_hub_ingest_equals_local_ingest(hub, tmp_path):
    """Same files from the Hub (paged listing, 3 workers) and from a folder: same store
    content and a bitwise-identical kernel; every file carries the commit and LFS sha256."""
    src = tmp_path / "src"
    write_files(src, FILES_A)
    (src / "README.md").write_text("not a log\n")
    commit = hub.add_commit(REPO, src)
    s = ingest(hub, tmp_path / "hub-store", tmp_path, workers=3)
    assert s.files_ingested == 5 and s.runs_total == 25
    ingest_dir(src, tmp_path / "local-store", show_progress=False)
    a, b = snapshot(tmp_path / "hub-store"), snapshot(tmp_path / "local-store")
    assert a["names"] == b["names"] == sorted(FILES_A)
    assert a["sha256"] == b["sha256"]
    np.testing.assert_array_equal(a["test"], b["test"])
    np.testing.assert_array_equal(a["train"], b["train"])
    ka = kernel_of(tmp_path / "hub-store", tmp_path / "k-hub")
    kb = kernel_of(tmp_path / "local-store", tmp_path / "k-local")
    assert ka.dtype == np.float32 and np.array_equal(ka, kb)
    m = Store.open(tmp_path / "hub-store").manifest
    import hashlib
    for f in m["files"]:
        digest = hashlib.sha256((src / f["name"]).read_bytes()).hexdigest()
        assert (f["commit"], f["hub_path"], f["lfs_sha256"], f["sha256"]) == (
            commit, f["name"], digest, digest)
    assert m["sources"] == [{"kind": "hub", "repo": f"datasets/{REPO}", "revision": "main",
                             "commit": commit, "path": "", "glob": "**/log.pt",
                             "endpoint": hub.url}]
    # listing went through pages; every download was pinned to the commit
    assert len(hub.requests("GET", f"/api/datasets/{REPO}/tree/{commit}")) >= 3
    resolves = [r["path"] for r in hub.requests() if "/resolve/" in r["path"]]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)
    # downloads are deleted once ingested
    assert download_dir_bytes(tmp_path / "cache") == 0


def test_selection_prefix_glob_max_files_max_runs(hub, tmp_path):
    src = tmp_path / "src"
    write_files(src, {**FILES_A, "other/run00/log.pt": 2})
    hub.add_commit(REPO, src)
    s = ingest(hub, tmp_path / "s1", tmp_path, spec=f"{SPEC}/logs_saveoutputs_main",
               max_files=2)
    assert snapshot(tmp_path / "s1")["names"] == sorted(FILES_A)[:2] and s.runs_total == 10
    # a literal glob lists only its folder and picks that one file
    s = ingest(hub, tmp_path / "s2", tmp_path, glob="logs_saveoutputs_main/run03/log.pt")
    assert snapshot(tmp_path / "s2")["names"] == ["logs_saveoutputs_main/run03/log.pt"]
    trees = [r["path"] for r in hub.requests("GET") if "/tree/" in r["path"]]
    assert trees[-1].endswith("/logs_saveoutputs_main%2Frun03")
    # a glob relative to the prefix works too; --max-runs stops before overshooting
    s = ingest(hub, tmp_path / "s3", tmp_path, spec=f"{SPEC}/logs_saveoutputs_main",
               glob="run0[0-3]/log.pt", max_runs=12)
    assert snapshot(tmp_path / "s3")["names"] == sorted(FILES_A)[:2] and s.runs_total == 10
    with pytest.raises(HubError, match="no files match"):
        ingest(hub, tmp_path / "s4", tmp_path, glob="nothing/*/log.pt")


def test_extend_from_revision_a_to_b(hub, tmp_path):
    """Ingest at commit A, then at main = B: only B's new files are downloaded and
    ingested; the files record their commits and the sources list records both."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    write_files(a_dir, dict(list(FILES_A.items())[:3]), seed=1)
    write_files(b_dir, {"logs_saveoutputs_main/run10/log.pt": 4,
                        "logs_saveoutputs_main/run11/log.pt": 2}, seed=2)
    commit_a = hub.add_commit(REPO, a_dir)
    commit_b = hub.add_commit(REPO, b_dir)
    store = tmp_path / "store"
    s1 = ingest(hub, store, tmp_path, spec=f"{SPEC}@{commit_a}")
    assert (s1.files_ingested, s1.runs_total) == (3, 13)
    n_before = len(hub.requests("GET"))
    s2 = ingest(hub, store, tmp_path)  # main -> B
    assert (s2.files_ingested, s2.files_skipped, s2.runs_total) == (2, 3, 19)
    got = [r["path"].split(f"/resolve/{commit_b}/")[1] for r in hub.requests("GET")[n_before:]
           if "/resolve/" in r["path"]]
    assert sorted(got) == ["logs_saveoutputs_main/run10/log.pt",
                           "logs_saveoutputs_main/run11/log.pt"]
    m = Store.open(store).manifest
    assert [f["commit"] for f in m["files"]] == [commit_a] * 3 + [commit_b] * 2
    assert [(x["revision"], x["commit"]) for x in m["sources"]] == [(commit_a, commit_a),
                                                                   ("main", commit_b)]
    # the extended store equals one ingest of all B's files from a folder
    write_files(tmp_path / "all", dict(list(FILES_A.items())[:3]), seed=1)
    write_files(tmp_path / "all", {"logs_saveoutputs_main/run10/log.pt": 4,
                                   "logs_saveoutputs_main/run11/log.pt": 2}, seed=2)
    ingest_dir(tmp_path / "all", tmp_path / "ref", show_progress=False)
    x, y = snapshot(store), snapshot(tmp_path / "ref")
    assert x["sha256"] == y["sha256"]
    np.testing.assert_array_equal(x["train"], y["train"])
    # once more: nothing new, nothing downloaded
    n_before = len(hub.requests())
    s3 = ingest(hub, store, tmp_path)
    assert s3.files_ingested == 0
    assert not [r for r in hub.requests()[n_before:] if "/resolve/" in r["path"]]


# ------------------------------------------------------------------------ faults

@pytest.mark.parametrize("nth", [1, 2], ids=["HEAD-500", "GET-500"])
def test_500_then_success_is_retried(hub, tmp_path, nth):
    """A 500 on the metadata request (retried by the library) or on the download
    (retried by us) is followed by success: the store is complete and correct."""
    src = tmp_path / "src"
    write_files(src, FILES_A)
    hub.add_commit(REPO, src)
    bad = sorted(FILES_A)[2]
    hub.fault(bad, "status", status=500, nth=nth)
    s = ingest(hub, tmp_path / "store", tmp_path, retries=2)
    assert s.files_ingested == 5
    seen = [r["method"] for r in hub.requests() if r["path"].endswith(bad)]
    # HEAD 500: the library asks again; GET 500: our retry starts over with HEAD
    assert seen == (["HEAD", "HEAD", "GET"] if nth == 1 else ["HEAD", "GET", "HEAD", "GET"])
    ingest_dir(src, tmp_path / "ref", show_progress=False)
    np.testing.assert_array_equal(snapshot(tmp_path / "store")["test"],
                                  snapshot(tmp_path / "ref")["test"])


@pytest.mark.fault
def test_persistent_500_gives_up_after_retries(hub, tmp_path, capsys):
    src = tmp_path / "src"
    write_files(src, FILES_A)
    hub.add_commit(REPO, src)
    bad = sorted(FILES_A)[1]
    hub.fault(bad, "status", status=503, times=0, method="GET")
    with pytest.raises(HubError) as ei:
        ingest(hub, tmp_path / "store", tmp_path, retries=2)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{SPEC}/{bad}: HTTP 503")
    assert "gave up after 3 attempt(s)" in msg
    assert len([r for r in hub.requests("GET") if r["path"].endswith(bad)]) == 3
    assert capsys.readouterr().err.count("retry ") == 2
    # what came before the failing file is committed; nothing of it or after it
    assert snapshot(tmp_path / "store")["names"] == sorted(FILES_A)[:1]


@pytest.mark.fault
def test_cut_download_resumes_with_range(hub, tmp_path):
    """The connection drops half-way through a 24 MB file; the client resumes with a
    Range request and the store holds exactly the file's runs."""
    src = tmp_path / "src"
    files = write_files(src, {"logs_saveoutputs_main/big/log.pt": 200}, n_test=1000,
                        n_train=5000, classes=10)
    path = "logs_saveoutputs_main/big/log.pt"
    size = (src / path).stat().st_size
    assert size > 2 * 10 * 2**20  # past the client's 10 MiB write chunk at the cut
    hub.add_commit(REPO, src)
    hub.fault(path, "cut", nth=2)
    s = ingest(hub, tmp_path / "store", tmp_path, retries=0)
    assert s.files_ingested == 1
    gets = [r for r in hub.requests("GET") if r["path"].endswith(path)]
    assert gets[0]["range"] is None and len(gets) == 2
    start = int(gets[1]["range"].removeprefix("bytes=").split("-")[0])
    assert 0 < start <= size // 2
    st = Store.open(tmp_path / "store")
    np.testing.assert_array_equal(st.read("train", 0, st.runs), files[path][1])
    assert st.manifest["files"][0]["sha256"] == st.manifest["files"][0]["lfs_sha256"]


@pytest.mark.fault
@pytest.mark.parametrize("where", ["first", "middle"])
def test_corrupt_byte_is_rejected(hub, tmp_path, where):
    """A flipped byte (loads fine as torch, wrong values) fails the LFS sha256 check:
    nothing of that file enters the store and its blob leaves the cache."""
    src = tmp_path / "src"
    write_files(src, FILES_A)
    hub.add_commit(REPO, src)
    names = sorted(FILES_A)
    bad = names[0] if where == "first" else names[2]
    hub.fault(bad, "corrupt", times=0)
    store = tmp_path / "store"
    with pytest.raises(BadInputError, match=f"{bad}: sha256 mismatch"):
        ingest(hub, store, tmp_path, keep_downloads=True)
    if where == "first":
        assert not Store.exists(store)
    else:
        assert snapshot(store)["names"] == names[:2]
    s = ingest(hub, store, tmp_path, skip_bad=True, keep_downloads=True)
    assert s.files_rejected == 1 and "sha256 mismatch" in s.errors[0]
    st = Store.open(store)
    good = [n for n in names if n != bad]
    assert [f["name"] for f in st.manifest["files"]] == good
    assert [r["name"] for r in st.manifest["rejected"]] == [bad]
    ingest_dir(src, tmp_path / "ref", show_progress=False)
    ref = Store.open(tmp_path / "ref")
    want = np.concatenate([ref.read("test", f["run_start"], f["run_stop"])
                           for f in ref.manifest["files"] if f["name"] != bad])
    np.testing.assert_array_equal(st.read("test", 0, st.runs), want)
    # the good files stay cached (--keep-downloads), the corrupt one does not
    blobs = {p.name for p in (tmp_path / "cache" / "datasets--local--sim" / "blobs").iterdir()}
    import hashlib
    assert hashlib.sha256((src / bad).read_bytes()).hexdigest() not in blobs
    assert len(blobs) == 4


@pytest.mark.parametrize("case,expect", [
    ("file-404", "{spec}/{file}: HTTP 404: not found at commit {commit} (wrong path or "
                 "revision?)"),
    ("file-403", "{spec}/{file}: HTTP 403 forbidden"),
    ("repo-404", "{spec2}: HTTP 404: repository not found"),
    ("rev-404", "{spec}@nope: HTTP 404: revision not found"),
    ("repo-401", "{spec}: HTTP 401 unauthorized: the repo is private or gated"),
])
def test_access_errors_are_one_line_and_immediate(hub, tmp_path, case, expect):
    src = tmp_path / "src"
    write_files(src, FILES_A)
    commit = hub.add_commit(REPO, src)
    f = sorted(FILES_A)[1]
    spec = SPEC
    if case == "file-404":
        hub.fault(f, "status", status=404, times=0)
    elif case == "file-403":
        hub.fault(f, "status", status=403, times=0)
    elif case == "repo-404":
        spec = "hf://datasets/local/nosuch"
    elif case == "rev-404":
        spec = f"{SPEC}@nope"
    else:
        hub.token = TOKEN
    with pytest.raises(HubError) as ei:
        ingest(hub, tmp_path / "store", tmp_path, spec=spec, retries=3)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(expect.format(spec=SPEC, spec2="hf://datasets/local/nosuch",
                                        file=f, commit=commit)), msg
    if case.startswith("file"):  # reported at once: one attempt, no retries
        assert len([r for r in hub.requests() if r["path"].endswith(f)]) == 1


def test_dead_endpoint_fails_fast(tmp_path):
    """No server: a one-line error after our (here instant) retries, not the client's
    own ~23 s of backoff."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(HubError, match="gave up after 2 attempt"):
        ingest_hub(SPEC, tmp_path / "store", endpoint=f"http://127.0.0.1:{port}",
                   cache_dir=tmp_path / "cache", retries=1, retry_wait=0.01,
                   show_progress=False)
    assert time.monotonic() - t0 < 5


def test_download_disk_stays_bounded(hub, tmp_path, monkeypatch):
    """Sampled while the server sends and after every download: the download folder
    never holds more than (download workers + converters + 2) x the largest file (the
    converters' window of converters + 1 files, and the one being committed); with
    --keep-downloads it would grow to all files, which the same sampling sees."""
    src = tmp_path / "src"
    runs = [9, 3, 12, 5, 8, 2, 11, 6, 7, 4, 10, 3]
    write_files(src, {f"logs_saveoutputs_main/r{i}/log.pt": r for i, r in enumerate(runs)},
                n_train=400)
    hub.add_commit(REPO, src)
    sizes = [p.stat().st_size for p in src.rglob("log.pt")]
    cache = tmp_path / "cache"
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], download_dir_bytes(cache))

    hub.on_send.append(sample)
    real = hubmod.hf_hub_download

    def download_and_sample(*a, **kw):
        p = real(*a, **kw)
        sample()
        return p

    monkeypatch.setattr(hubmod, "hf_hub_download", download_and_sample)
    workers, converters = 2, 1
    runs_ = sum(runs)
    ingest(hub, tmp_path / "store", tmp_path, workers=workers, cache_dir=cache,
           converters=converters)
    assert 0 < peak[0] <= (workers + converters + 2) * max(sizes)
    assert download_dir_bytes(cache) == 0
    peak[0] = 0
    cache = tmp_path / "cache2"
    ingest(hub, tmp_path / "kept", tmp_path, workers=workers, keep_downloads=True,
           cache_dir=cache, converters=converters)
    sample()
    assert peak[0] == sum(sizes) > (workers + converters + 2) * max(sizes)
    assert Store.open(tmp_path / "kept").runs == runs_


# ---------------------------------------------------------------- CLI, tokens, jobs

def _env(hub_server: HubServer, home: Path, **extra: str) -> dict:
    return {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", **extra}


def test_cli_token_is_sent_but_never_shown_or_stored(hub, tmp_path, hf_env):
    src = tmp_path / "src"
    write_files(src, FILES_A)
    commit = hub.add_commit(REPO, src)
    hub.token = TOKEN
    store, cache = tmp_path / "store", tmp_path / "cache"
    p = run_cli("ingest", SPEC, "--store", str(store), "--cache-dir", str(cache),
                "--download-workers", "2", "--keep-downloads",
                env=_env(hub, hf_env, HF_TOKEN=TOKEN))
    assert "5 file(s) ingested" in p.stdout
    assert {r["auth"] for r in hub.requests()} == {f"Bearer {TOKEN}"}
    info = run_cli("info", str(store), env=_env(hub, hf_env, HF_TOKEN=TOKEN))
    texts = [p.stdout, p.stderr, info.stdout, info.stderr]
    for root in (store, cache, hf_env):
        texts += [f.read_bytes().decode("latin-1") for f in Path(root).rglob("*")
                  if f.is_file() and not f.is_symlink()]
    assert not [t for t in texts if TOKEN in t]
    # info: one line per file with its full sha256 and the commit; the source's commit
    import hashlib
    for name in FILES_A:
        digest = hashlib.sha256((src / name).read_bytes()).hexdigest()
        line = [ln for ln in info.stdout.splitlines() if name in ln]
        assert len(line) == 1 and digest in line[0] and f"commit {commit}" in line[0]
    assert f"commit={commit}" in info.stdout and f"repo=datasets/{REPO}" in info.stdout


@pytest.mark.parametrize("case", ["401", "404"])
def test_cli_access_error_is_one_line_naming_the_file(hub, tmp_path, hf_env, case):
    src = tmp_path / "src"
    write_files(src, FILES_A)
    commit = hub.add_commit(REPO, src)
    f = sorted(FILES_A)[3]
    hub.fault(f, "status", status=int(case), times=0)
    p = run_cli("ingest", SPEC, "--store", str(tmp_path / "store"), "--cache-dir",
                str(tmp_path / "cache"), env=_env(hub, hf_env), check=False)
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("kernelscale: error:")]
    assert len(err) == 1 and err == p.stderr.strip().splitlines()[-1:]
    assert err[0].startswith(f"kernelscale: error: {SPEC}/{f}: HTTP {case}")
    assert ("HF_TOKEN" in err[0]) if case == "401" else (f"commit {commit}" in err[0])


def test_job_with_hub_source(hub, tmp_path, hf_env):
    """A job's [ingest] source = "hf://..." runs through the Hub source (endpoint from
    the library's HF_ENDPOINT setting) and then kernel and evaluate as usual."""
    from tests.reference import labels_file

    src = tmp_path / "src"
    write_files(src, FILES_A)
    hub.add_commit(REPO, src)
    labels_file(tmp_path / "labels.npz", 70, 30, 5)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
name = "hub"
workdir = "{tmp_path / 'w'}"
[ingest]
source = "{SPEC}/logs_saveoutputs_main"
max_files = 4
download_workers = 2
retries = 1
cache_dir = "hf-cache"
[kernel]
device = "cpu"
[evaluate]
labels = "{tmp_path / 'labels.npz'}"
""")
    p = run_cli("run", str(job), env=_env(hub, hf_env))
    assert "kernel accuracy (k-NN w/ k=3)" in p.stdout
    st = Store.open(tmp_path / "w" / "store")
    assert [f["name"] for f in st.manifest["files"]] == sorted(FILES_A)[:4]
    assert (tmp_path / "w" / "hf-cache").is_dir()
    assert (tmp_path / "w" / "results.json").is_file()


def test_real_data_jobs_load_without_network():
    from kernelscale.config import load_job

    ref = "logs_saveoutputs_main/06109e85-f5d7-4ac8-b0b0-f03542f23234/log.pt"
    for name, glob in (("cifar10-500", ref), ("cifar10-20k", "**/log.pt")):
        cfg = load_job(ROOT / "jobs" / f"{name}.toml")
        spec = parse_hub_spec(cfg.ingest.source)
        assert (spec.repo_id, spec.prefix) == ("kjj0/cifar10-multirun-logits",
                                                "logs_saveoutputs_main")
        assert cfg.ingest.glob == glob and glob_regex(glob).match(ref)
        assert cfg.kernel and cfg.evaluate and cfg.evaluate.labels.startswith("cifar10:")
        assert cfg.path_of(cfg.ingest.source) == cfg.ingest.source


def test_cifar10_labels_offline_is_one_clear_line(monkeypatch, tmp_path):
    import urllib.error

    import torchvision

    from kernelscale.labels import load_labels

    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(BadInputError) as ei:
        load_labels(f"cifar10:{tmp_path}")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"cifar10:{tmp_path}: CIFAR-10 is not under")
    assert "--labels FILE.npz" in msg


def test_abandoned_partial_downloads_are_swept(hub, tmp_path):
    """A killed ingest leaves ``<blob>.<8 hex>.incomplete`` (never resumed by 2.x): the next
    ingest removes such files once stale, and keeps fresh ones and ``<blob>.incomplete``."""
    import os
    import time

    from huggingface_hub.file_download import repo_folder_name

    src = tmp_path / "src"
    write_files(src, {"logs_saveoutputs_main/run00/log.pt": 3})
    hub.add_commit(REPO, src)
    blobs = tmp_path / "cache" / repo_folder_name(repo_id=REPO, repo_type="dataset") / "blobs"
    blobs.mkdir(parents=True)
    stale = blobs / "0123abcd.deadbeef.incomplete"
    fresh = blobs / "4567abcd.cafef00d.incomplete"
    legacy = blobs / "89abcdef.incomplete"
    for p in (stale, fresh, legacy):
        p.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    for p in (stale, legacy):
        os.utime(p, (old, old))
    s = ingest(hub, tmp_path / "store", tmp_path)
    assert s.files_ingested == 1
    assert not stale.exists() and fresh.exists() and legacy.exists()


def test_dask_workers_are_for_local_folders_only(tmp_path):
    """Files downloaded ahead for dask workers would pass the disk bound, and a remote
    scheduler's workers cannot read this host's cache: refused before any request."""
    for kw in ({"workers": 2}, {"scheduler": "tcp://127.0.0.1:1"}):
        with pytest.raises(ConfigError, match="--workers/--scheduler convert local folders"):
            run_ingest(IngestConfig(SPEC, tmp_path / "store", **kw))
    assert not (tmp_path / "store").exists()


@pytest.mark.fault
def test_a_rewritten_path_is_an_error_naming_both_hashes(hub, tmp_path):
    """A newer revision that rewrites an ingested path is not silently skipped: the
    ingest stops naming both sha256s and leaves the store as it was."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    name = "logs_saveoutputs_main/run00/log.pt"
    write_files(a_dir, {name: 4}, seed=1)
    write_files(b_dir, {name: 4}, seed=2)  # same path, other content
    hub.add_commit(REPO, a_dir)
    store = tmp_path / "store"
    ingest(hub, store, tmp_path)
    before = Store.open(store).manifest
    old_sha = before["files"][0]["sha256"]
    hub.add_commit(REPO, b_dir)
    with pytest.raises(BadInputError) as ei:
        ingest(hub, store, tmp_path)
    msg = str(ei.value)
    new_sha = hashlib.sha256((b_dir / name).read_bytes()).hexdigest()
    assert name in msg and old_sha in msg and new_sha in msg and "\n" not in msg
    assert Store.open(store).manifest == before


@pytest.mark.fault
def test_files_another_tool_downloaded_into_the_cache_are_never_deleted(hub, tmp_path):
    """Pointed at a shared cache, ingest deletes only what it downloaded itself."""
    src = tmp_path / "src"
    write_files(src, dict(list(FILES_A.items())[:3]))
    commit = hub.add_commit(REPO, src)
    cache = tmp_path / "shared-cache"
    theirs = sorted(FILES_A)[1]
    # another tool downloaded one of the files before
    p = Path(hubmod.hf_hub_download("local/sim", theirs, repo_type="dataset",
                                    revision=commit, cache_dir=cache, endpoint=hub.url))
    blob = Path(os.path.realpath(p))
    before = (p.read_bytes(), blob.stat().st_mtime_ns)
    s = ingest(hub, tmp_path / "store", tmp_path, cache_dir=cache)
    assert s.files_ingested == 3
    assert p.exists() and blob.exists()
    assert (p.read_bytes(), blob.stat().st_mtime_ns) == before
    left = [q for q in (cache / "datasets--local--sim" / "blobs").iterdir()]
    assert left == [blob]  # the two files this ingest downloaded are gone
    # a file a killed ingest of ours left behind carries our claim: the next one deletes it
    (cache / ".kernelscale-claims").mkdir(exist_ok=True)
    (cache / ".kernelscale-claims" / blob.name).touch()
    ingest(hub, tmp_path / "store2", tmp_path, cache_dir=cache)
    assert not blob.exists() and not list((cache / ".kernelscale-claims").iterdir())


@pytest.mark.fault
def test_an_unsafe_hub_path_is_rejected_and_the_good_files_go_in(hub, tmp_path):
    """A listing with a '..' path: refused before any download; with --skip-bad it is
    recorded as rejected and the good files are ingested."""
    src = tmp_path / "src"
    write_files(src, dict(list(FILES_A.items())[:2]))
    sha = hub.add_commit(REPO, src)
    files = hub.repos[REPO].commits[sha]
    evil = "logs_saveoutputs_main/../../evil/log.pt"
    files[evil] = files[sorted(files)[0]]
    with pytest.raises(BadInputError, match="unsafe path"):
        ingest(hub, tmp_path / "s1", tmp_path)
    assert not (tmp_path / "s1").exists()
    s = ingest(hub, tmp_path / "s2", tmp_path, skip_bad=True)
    assert (s.files_ingested, s.files_rejected) == (2, 1)
    m = Store.open(tmp_path / "s2").manifest
    assert [r["name"] for r in m["rejected"]] == [evil]
    assert not any(evil in r["path"] for r in hub.requests("GET"))
