"""``kernelscale ls`` and ``ingest --dry-run`` against the offline Hub server
(tests/hubserver.py) and local folders; the truth is read from the files with torch, or
is what numpy, safetensors and zarr were given to write."""

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelscale.formats.torchzip import HeaderError, pickle_tensors, read_directory
from kernelscale.listing import list_source
from kernelscale.simulation import simulate
from kernelscale.sources.ranged import RangedFile
from kernelscale.store import Store
from tests.conftest import run_cli
from tests.hubserver import HubServer
from tests.test_hub import TOKEN, _env, hf_env  # noqa: F401 -- hf_env: autouse fixture

REPO = "local/multi"
SPEC = f"hf://datasets/{REPO}"
#: the simulated configurations: folder -> (runs, files)
CONFIGS = {"cfg_a": (36, 3), "cfg_b": (20, 2), "cfg_c": (24, 4)}
SHAPE = {"n_test": 100, "n_train": 400, "classes": 10}  # 10,000 bytes per run


@pytest.fixture
def hub():
    with HubServer(page_size=4) as server:
        yield server


def multi_config(root: Path, configs: dict = CONFIGS) -> Path:
    """A simulated multi-configuration dataset: one folder of log.pt files per
    configuration (each from its own seed), labels.npz and a README at the top."""
    for i, (name, (runs, files)) in enumerate(configs.items()):
        sim = root.parent / f"sim-{name}"
        simulate(sim, runs=runs, files=files, seed=i, progress=False, **SHAPE)
        shutil.copytree(sim / "logs_saveoutputs_main", root / name)
        shutil.copy(sim / "labels.npz", root / "labels.npz")
    (root / "README.md").write_text("three training configurations\n")
    return root


def truth(root: Path, depth: int = 1) -> dict:
    """Per folder: files, bytes and runs, from the files themselves (torch.load)."""
    out: dict = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).parts
        folder = "/".join(rel[:-1][:depth]) or "."
        d = out.setdefault(folder, {"files": 0, "bytes": 0, "runs": None, "entries": {}})
        d["files"] += 1
        d["bytes"] += p.stat().st_size
        if p.suffix == ".pt":
            runs = int(torch.load(p, weights_only=True)["logits"].shape[0])
            d["runs"] = (d["runs"] or 0) + runs
            d["entries"][p.relative_to(root).as_posix()] = runs
    return out


def check_against_truth(doc: dict, want: dict) -> None:
    got = {f["folder"]: f for f in doc["folders"]}
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert (g["files"], g["bytes"], g["runs"]) == (w["files"], w["bytes"], w["runs"]), name
        runs = {e["name"]: e["runs"] for e in g["entries"] if e["method"] != "n/a"}
        assert runs == w["entries"]
    assert doc["total"]["runs"] == sum(w["runs"] or 0 for w in want.values())


def resolve_gets(hub_server: HubServer) -> list[dict]:
    return [r for r in hub_server.requests("GET") if "/resolve/" in r["path"]]


# ------------------------------------------------------------------------------ ls

def test_ls_hub_counts_sizes_and_runs_match_the_files(hub, tmp_path, hf_env):  # noqa: F811
    root = multi_config(tmp_path / "repo")
    commit = hub.add_commit(REPO, root)
    p = run_cli("ls", SPEC, "--json", env=_env(hub, hf_env))
    doc = json.loads(p.stdout)
    assert doc["commit"] == commit and doc["revision"] == "main"
    check_against_truth(doc, truth(root))
    for f in doc["folders"]:
        if f["folder"] != ".":  # one header per folder, the rest from the zip directory
            assert f["methods"] == {"header": 1, "zip": f["files"] - 1}
            assert f["shape"]["n_train"] == 400 and f["shape"]["dtype"] == "float16"
    # nothing downloaded: every read of a file is a ranged GET of a part of it
    gets = resolve_gets(hub)
    assert gets and all(r["range"] for r in gets)
    assert all(f"/resolve/{commit}/" in r["path"] for r in gets)
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*.pt")}
    for name, size in sizes.items():
        mine = [r for r in gets if r["path"].endswith(name)]
        spans = [r["range"].removeprefix("bytes=").split("-") for r in mine]
        assert sum(int(b) - int(a) + 1 for a, b in spans) < size / 2, name
    assert doc["probe"]["requests"] == len(gets)
    assert not (hf_env / "hub").exists()  # nothing written to the Hub cache
    # the table: one row per folder with its counts, and the commit
    p = run_cli("ls", SPEC, env=_env(hub, hf_env))
    assert f"commit {commit}" in p.stdout
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith("cfg_")}
    assert {k: int(v[4]) for k, v in rows.items()} == {k: r for k, (r, _) in CONFIGS.items()}
    assert rows["cfg_c"][1] == "4" and "header 1, zip 3" in " ".join(rows["cfg_c"])


def test_ls_past_probe_counts_runs_by_size(hub, tmp_path):
    """--probe 1: one file read per folder; the others' runs from their sizes, still the
    files' own counts, and no request for them."""
    root = multi_config(tmp_path / "repo", {"cfg_a": (30, 3), "cfg_b": (23, 5)})
    hub.add_commit(REPO, root)
    listing = list_source(SPEC, probe=1, endpoint=hub.url)
    doc = listing.as_json()
    check_against_truth(doc, truth(root))
    for f in doc["folders"][:2]:
        assert f["methods"] == {"header": 1, "size": f["files"] - 1}
    # one log.pt per folder, and labels.npz (its header holds no logits)
    read = {r["path"].rsplit("/", 1)[1] for r in resolve_gets(hub)}
    assert len({r["path"] for r in resolve_gets(hub)}) == 3 and "labels.npz" in read
    assert "size: the file's size" in listing.table()


def test_ls_pins_the_revision(hub, tmp_path):
    """@REV: the listing and every byte read are of that commit, not of main."""
    root = multi_config(tmp_path / "repo")
    first = tmp_path / "first"
    shutil.copytree(root / "cfg_a", first / "cfg_a")
    old = hub.add_commit(REPO, first)
    new = hub.add_commit(REPO, root)
    doc = list_source(f"{SPEC}@{old}", endpoint=hub.url).as_json()
    assert doc["commit"] == old and [f["folder"] for f in doc["folders"]] == ["cfg_a"]
    check_against_truth(doc, truth(first))
    assert all(f"/resolve/{old}/" in r["path"] for r in resolve_gets(hub))
    doc = list_source(SPEC, endpoint=hub.url).as_json()
    assert doc["commit"] == new and len(doc["folders"]) == 4
    # a prefix, a glob and a depth below it
    doc = list_source(f"{SPEC}@{new}/cfg_b", depth=0, glob="**/log.pt",
                      endpoint=hub.url).as_json()
    assert [(f["folder"], f["files"], f["runs"]) for f in doc["folders"]] == [(".", 2, 20)]


def test_ls_private_repo_without_token_is_one_line(hub, tmp_path, hf_env):  # noqa: F811
    root = multi_config(tmp_path / "repo", {"cfg_a": (6, 2)})
    hub.add_commit(REPO, root)
    hub.token = TOKEN
    p = run_cli("ls", SPEC, env=_env(hub, hf_env), check=False)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"kernelscale: error: {SPEC}: HTTP 401") and "HF_TOKEN" in line
    p = run_cli("ls", SPEC, "--json", env=_env(hub, hf_env, HF_TOKEN=TOKEN))
    assert json.loads(p.stdout)["total"]["runs"] == 6
    assert TOKEN not in p.stdout + p.stderr
    assert {r["auth"] for r in hub.requests()} - {None} == {f"Bearer {TOKEN}"}


def test_ls_a_file_that_cannot_be_read_falls_back_to_its_size(hub, tmp_path):
    root = multi_config(tmp_path / "repo", {"cfg_a": (12, 3)})
    hub.add_commit(REPO, root)
    bad = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.pt"))[1]
    hub.fault(bad, "status", status=404, times=0)
    listing = list_source(SPEC, endpoint=hub.url, retry_wait=0.01)
    doc = listing.as_json()
    check_against_truth(doc, truth(root))
    entry = next(e for e in doc["folders"][0]["entries"] if e["name"] == bad)
    assert entry["method"] == "size" and "HTTP 404" in entry["note"]
    assert any(bad in n for n in doc["notes"])


def test_ls_local_folder_equals_the_hub_listing(hub, tmp_path):
    root = multi_config(tmp_path / "repo")
    hub.add_commit(REPO, root)
    local = list_source(root).as_json()
    remote = list_source(SPEC, endpoint=hub.url).as_json()
    check_against_truth(local, truth(root))
    assert local["folders"] == remote["folders"]
    assert local["probe"]["requests"] == 0 and local["kind"] == "local"
    p = run_cli("ls", str(root), "--depth", "0", "--glob", "**/log.pt")
    (row,) = [ln.split() for ln in p.stdout.splitlines() if ln.startswith(". ")]
    assert (row[1], row[4]) == ("9", "80")


def test_ls_declared_shape_when_a_header_is_not_decoded(tmp_path):
    """--shape and files whose pickle holds what the decoder does not read (a set): the
    runs come from the storages' sizes in the zip directory."""
    runs = {"cfg/a/log.pt": 3, "cfg/b/log.pt": 5}
    for name, r in runs.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True)
        torch.save({"logits": torch.zeros(r, 6, 3, dtype=torch.float16),
                    "logits_train": torch.zeros(r, 9, 3, dtype=torch.float16),
                    "tags": {"a", "b"}}, tmp_path / "src" / name, pickle_protocol=4)
    doc = list_source(tmp_path / "src", shape=(6, 9, 3)).as_json()
    (folder,) = doc["folders"]
    assert folder["runs"] == 8 and folder["methods"] == {"zip": 2}
    assert folder["shape"]["from"] == "--shape"
    assert any("not read here" in n for n in doc["notes"])
    doc = list_source(tmp_path / "src").as_json()  # no shape: runs unknown, said so
    assert doc["folders"][0]["runs"] is None and doc["folders"][0]["methods"] == {"unknown": 2}
    p = run_cli("ls", str(tmp_path / "src"), "--shape", "12", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--shape '12'" in p.stderr


# -------------------------------------------------------------------- the headers

def test_header_is_decoded_without_unpickling(tmp_path):
    buf = io.BytesIO()
    torch.save({"logits": torch.zeros(7, 3, 4, dtype=torch.float16),
                "logits_train": torch.zeros(7, 5, 4, dtype=torch.float32), "code": "x" * 999},
               buf)
    zf, tz = read_directory(io.BytesIO(buf.getvalue()), "f")
    assert sorted(tz.storages.values()) == [7 * 3 * 4 * 2, 7 * 5 * 4 * 4]
    from kernelscale.formats.torchzip import read_pickle
    t = read_pickle(zf, tz, "f")
    assert (t["logits"].shape, t["logits"].dtype) == ((7, 3, 4), "float16")
    assert (t["logits_train"].shape, t["logits_train"].dtype) == ((7, 5, 4), "float32")
    assert "code" not in t

    # a pickle that would run code when loaded: decoded, nothing called or imported
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps({"logits": Evil()}, protocol=2)
    assert pickle_tensors(data, "evil") == {}
    assert not marker.exists()
    with pytest.raises(HeaderError):
        pickle_tensors(pickle.dumps({1, 2}, protocol=4), "set")  # an opcode not read
    with pytest.raises(HeaderError, match="not a torch.save zip"):
        read_directory(io.BytesIO(b"\x80\x02}q\x00."), "legacy")


def test_ranged_file_reads_the_tail_once_and_serves_zipfile(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/data.pkl", b"x" * 10)
        zf.writestr("a/data/0", os.urandom(200_000))
    data = buf.getvalue()
    asked = []

    def fetch(a, b):
        asked.append((a, b))
        return data[a:b]

    fh = RangedFile(len(data), fetch, tail=4096, block=1024)
    zf2, tz = read_directory(fh, "r")
    assert tz.storages == {"0": 200_000} and fh.requests == 1
    assert asked == [(len(data) - 4096, len(data))]
    assert zf2.read("a/data.pkl") == b"x" * 10 and fh.requests == 2
    assert fh.bytes_fetched < 8192


# ------------------------------------------------------------------ ingest --dry-run

def tree_state(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for n in dirs + files:
                p = Path(dirpath) / n
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def test_hub_dry_run_downloads_nothing_and_matches_the_ingest(hub, tmp_path, hf_env):  # noqa: F811
    root = multi_config(tmp_path / "repo")
    commit = hub.add_commit(REPO, root)
    store, cache = tmp_path / "store", tmp_path / "cache"
    env = _env(hub, hf_env)
    before = tree_state(tmp_path)
    args = ("ingest", f"{SPEC}/cfg_a", "--store", str(store), "--cache-dir", str(cache),
            "--download-workers", "2", "--labels", str(root / "labels.npz"))
    p = run_cli(*args, "--dry-run", "--json", env=env)
    plan = json.loads(p.stdout)
    assert tree_state(tmp_path) == before and not store.exists() and not cache.exists()
    assert all(r["range"] for r in resolve_gets(hub))
    assert plan["commit"] == commit and plan["labels"].startswith("would be recorded")
    text = run_cli(*args, "--dry-run", env=env).stdout
    assert f"commit {commit}" in text and "36 (from header 1, zip 2)" in text
    assert tree_state(tmp_path) == before
    p = run_cli(*args, env=env)
    st = Store.open(store)
    assert plan["files"]["to_ingest"] == len(st.manifest["files"]) == 3
    assert plan["runs"]["to_add"] == st.runs == 36
    assert plan["download_bytes"] == sum(f["size"] for f in st.manifest["files"])
    assert [e["name"] for e in plan["entries"]] == [f["name"] for f in st.manifest["files"]]
    assert [e["runs"] for e in plan["entries"]] == [f["runs"] for f in st.manifest["files"]]
    assert f"+{plan['runs']['to_add']} = 36" in p.stdout
    check_store_bytes(plan, store)
    assert plan["disk"]["cache_peak"] == min(plan["download_bytes"],
                                             (2 + 2 + 2) * max(e["size"]
                                                               for e in plan["entries"]))
    # again: nothing left to do, the labels are already there
    again = json.loads(run_cli(*args, "--dry-run", "--json", env=env).stdout)
    assert again["files"]["skipped"] == 3 and again["runs"]["to_add"] == 0
    assert again["labels"].startswith("already recorded")


def check_store_bytes(plan: dict, store: Path) -> None:
    """The plan's logits and statistics bytes are the store's chunk files' exactly; the
    total is at least the whole store's and within a few KiB of it."""
    def size(paths):
        return sum(p.stat().st_size for p in paths if p.is_file())

    logits = size(p for p in (store / "logits").rglob("*") if "/c/" in str(p))
    stats = size(p for p in (store / "stats").rglob("*") if "/c/" in str(p))
    whole = size(store.rglob("*"))
    disk = plan["disk"]["store"]
    assert (disk["logits"], disk["statistics"]) == (logits, stats)
    assert whole <= disk["total"] <= whole + 16 * 1024


# ------------------------------------------------------------- every input format

def formats_source(root: Path) -> dict[str, list[tuple[str, int]]]:
    """One folder per input format (numpy, safetensors and zarr write them), three units
    each; returns, per folder, each unit's (name, runs) as the writers made them."""
    from tests.test_formats import WRITERS, write_group

    rng = np.random.default_rng(11)
    want: dict[str, list[tuple[str, int]]] = {}
    for kind, (writer, _, _, _) in WRITERS.items():
        for i, r in enumerate((12, 13, 14)):
            d = root / kind / (f"c{i}" if kind == "npy-folder" else "")
            d.mkdir(parents=True, exist_ok=True)
            te = rng.normal(size=(r, SHAPE["n_test"], SHAPE["classes"])).astype(np.float16)
            tr = rng.normal(size=(r, SHAPE["n_train"], SHAPE["classes"])).astype(np.float16)
            file = {"safetensors": f"chunk{i}.safetensors", "npy": f"chunk{i}",
                    "npy-folder": ""}.get(kind, f"chunk{i}.npz")
            writer(d, te, tr, name=file)
            rel = d.relative_to(root).as_posix()
            name = {"npy": f"{rel}/chunk{i}.{{logits,logits_train}}.npy",
                    "npy-folder": f"{rel}/{{logits,logits_train}}.npy"}.get(kind,
                                                                          f"{rel}/{file}")
            want.setdefault(kind, []).append((name, r))
    te = rng.normal(size=(9, SHAPE["n_test"], SHAPE["classes"])).astype(np.float32)
    tr = rng.normal(size=(9, SHAPE["n_train"], SHAPE["classes"])).astype(np.float32)
    for v in (2, 3):
        write_group(root / f"zarr{v}" / "g.zarr", te, tr, run_chunk=3, zarr_format=v)
        meta = ".zarray" if v == 2 else "zarr.json"
        want[f"zarr{v}"] = [(f"zarr{v}/g.zarr/{{logits,logits_train}}/{meta}", 9)]
    return want


def test_ls_counts_every_format_from_its_headers_locally_and_on_the_hub(hub, tmp_path):
    """safetensors, .npz (stored and compressed), .npy pairs (two naming conventions)
    and Zarr v2/v3 groups: each unit's runs from its header, the same locally and over
    hf:// by ranged reads of a part of each file; the labels beside them hold no runs."""
    root = tmp_path / "repo"
    want = formats_source(root)
    np.savez(root / "labels.npz", train=np.zeros(400, np.int64), test=np.zeros(100, np.int64))
    commit = hub.add_commit(REPO, root)
    local = list_source(root).as_json()
    remote = list_source(SPEC, endpoint=hub.url).as_json()
    assert local["folders"] == remote["folders"] and remote["commit"] == commit
    got = {f["folder"]: f for f in remote["folders"]}
    for kind, units in want.items():
        folder = got[kind]
        entries = [(e["name"], e["runs"]) for e in folder["entries"] if e["method"] != "n/a"]
        assert entries == units, kind
        method = "array" if kind.startswith("zarr") else "header"
        assert folder["methods"] == {method: len(units)}, kind
        assert folder["runs"] == sum(r for _, r in units)
        files = [p for p in (root / kind).rglob("*") if p.is_file()]
        assert folder["files"] == len(files)
        assert folder["bytes"] == sum(p.stat().st_size for p in files)
        dtype = "float32" if kind.startswith("zarr") else "float16"
        assert (folder["shape"]["n_test"], folder["shape"]["n_train"],
                folder["shape"]["dtype"]) == (100, 400, dtype)
    (labels,) = got["."]["entries"]
    assert labels["method"] == "n/a" and "not logits" in labels["note"]
    assert remote["total"]["runs"] == sum(r for u in want.values() for _, r in u)
    assert not remote["notes"]
    # every read is a part of a file (a Zarr metadata document: the whole of it)
    gets = resolve_gets(hub)
    assert gets and all(r["range"] for r in gets)
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
             if p.is_file() and p.suffix in (".npz", ".npy", ".safetensors")
             and p.name != "labels.npz"}
    for name, size in sizes.items():
        spans = [r["range"].removeprefix("bytes=").split("-") for r in gets
                 if r["path"].endswith("/" + name)]
        assert spans and sum(int(b) - int(a) + 1 for a, b in spans) < size / 2, name
    assert remote["probe"]["requests"] == len(gets)
    text = list_source(SPEC, endpoint=hub.url).table()
    assert "npz-compressed" in text and "array: the array shape in a Zarr group" in text
    assert "no file downloaded" in text


def test_dry_run_counts_a_hub_source_of_safetensors(hub, tmp_path, hf_env):  # noqa: F811
    root = tmp_path / "repo"
    want = formats_source(root)
    hub.add_commit(REPO, root)
    p = run_cli("ingest", f"{SPEC}/safetensors", "--store", str(tmp_path / "store"),
                "--glob", "**/*.safetensors", "--dry-run", "--json", env=_env(hub, hf_env))
    plan = json.loads(p.stdout)
    assert plan["runs"]["to_add"] == sum(r for _, r in want["safetensors"])
    assert plan["runs"]["methods"] == {"header": 3}
    assert not (tmp_path / "store").exists()


def test_absurd_header_lengths_are_refused_by_one_line_naming_the_file(hub, tmp_path):
    """A safetensors header length or an .npy header past the bounds: not read, one
    note naming the file, and only the first block of it fetched."""
    import struct

    root = tmp_path / "repo"
    (root / "st").mkdir(parents=True)
    body = b"{" + b" " * 200_000
    (root / "st" / "big.safetensors").write_bytes(struct.pack("<Q", 50_000_000) + body)
    hlen = 1_000_000  # an .npy v2 header of 1 MB (numpy reads at most 10,000 bytes)
    (root / "st" / "x.logits.npy").write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", hlen)
                                               + b" " * 100_000)
    np.save(root / "st" / "x.logits_train.npy", np.zeros((1, 4, 2), np.float16))
    hub.add_commit(REPO, root)
    doc = list_source(SPEC, endpoint=hub.url).as_json()
    notes = {e["name"]: e["note"] for e in doc["folders"][0]["entries"]}
    assert ("safetensors header of 50000000 bytes, more than the 4194304 read for a header"
            in notes["st/big.safetensors"])
    assert "st/big.safetensors" in notes["st/big.safetensors"]
    assert "x.logits.npy" in notes["st/x.{logits,logits_train}.npy"]
    assert (".npy header of 1000000 bytes, more than the 10000 numpy reads"
            in notes["st/x.{logits,logits_train}.npy"])
    assert all(e["runs"] is None for e in doc["folders"][0]["entries"])
    assert all(len(n.splitlines()) == 1 for n in doc["notes"]) and len(doc["notes"]) == 2
    assert doc["probe"]["bytes_read"] <= 3 * 8192  # the first block of each file


def test_ranged_file_refuses_to_fetch_past_its_limit():
    data = bytes(range(256)) * 400
    fh = RangedFile(len(data), lambda a, b: data[a:b], tail=1024, block=1024, limit=4096,
                   name="f")
    assert fh.read(100) == data[:100]
    fh.seek(50_000)
    with pytest.raises(OSError, match="f: reading its header would fetch more than 4096"):
        fh.read(5000)
    assert fh.bytes_fetched <= 4096
