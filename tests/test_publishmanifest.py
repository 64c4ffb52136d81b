"""``kernelscale publish`` deleting what an earlier publish of the same output put in the
repo and is gone locally, and nothing else; against the local Hub server
(tests/hubserver.py), whose commits are read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale.publishfiles import LocalFile
from kernelscale.publishmanifest import MANIFEST, Record, under
from tests.conftest import ingest_dir
from tests.hubserver import HubServer
from tests.reference import random_source
from tests.test_publish import REPO, TARGET, hf_env, pub, writes  # noqa: F401 -- autouse


@pytest.fixture
def hub():
    with HubServer(page_size=7) as server:
        yield server

def report(folder: Path, pages: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("<html>report</html>\n")
    (folder / "report.json").write_text("{}\n")
    for p in pages:
        (folder / p).write_bytes(b"\x89PNG\r\n\x1a\n" + p.encode() * 50)
    return folder


def commit_files(hub: HubServer, tmp: Path, files: dict[str, bytes]) -> None:
    """Someone else's commit of ``files`` (path in repo -> bytes) on main."""
    root = tmp / f"theirs-{len(hub.repos[REPO].commits) if REPO in hub.repos else 0}"
    for p, data in files.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(data)
    hub.add_commit(REPO, root)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """Two complete kernels of one store, tiled differently (different chunk files)."""
    from kernelscale.kernel import KernelConfig, compute_kernel

    wd = tmp_path_factory.mktemp("kernels")
    random_source(wd / "src", [4, 4], seed=2)
    ingest_dir(wd / "src", wd / "store", show_progress=False)
    for name, chunks in (("a", (16, 32)), ("b", (40, 96))):
        compute_kernel(KernelConfig(store=wd / "store", out=wd / name / "kernel",
                                    device="cpu", chunks=chunks, show_progress=False))
    return wd / "a" / "kernel", wd / "b" / "kernel"


# ----------------------------------------------------------------------- deleting

def test_a_page_removed_locally_is_deleted_and_nothing_else(hub, tmp_path):
    rep = report(tmp_path / "report", ["a.png", "b.png", "old.png"])
    pub(hub, rep, f"{TARGET}/cfg", create=True)
    commit_files(hub, tmp_path, {"cfg/report/theirs.png": b"their page",
                                 "cfg/notes.txt": b"their notes",
                                 "cfg/reportx/old.png": b"a sibling folder"})
    (rep / "old.png").unlink()
    before = hub.repos[REPO].refs["main"]
    n = len(hub.requests())
    s = pub(hub, rep, f"{TARGET}/cfg", dry_run=True)
    assert s.deleted == ["cfg/report/old.png"] and writes(hub, n) == []
    assert "would delete 1 file(s)" in s.line()

    s = pub(hub, rep, f"{TARGET}/cfg")
    served = hub.files(REPO)
    assert s.deleted == ["cfg/report/old.png"] and "cfg/report/old.png" not in served
    assert "deleted 1 file(s) published before and gone locally" in s.line()
    assert served["cfg/report/theirs.png"] == b"their page"  # foreign, same folder
    assert served["cfg/notes.txt"] == b"their notes"  # outside the output
    assert served["cfg/reportx/old.png"] == b"a sibling folder"
    old = hub.files(REPO, before)
    assert set(old) - set(served) == {"cfg/report/old.png"}
    assert "`cfg/report/old.png`" not in served["README.md"].decode()
    rec = json.loads(served[MANIFEST])["outputs"]
    assert sorted(rec["cfg/report"]) == [f"cfg/report/{p}" for p in
                                         ("a.png", "b.png", "index.html", "report.json")]
    # the same content again: no commit at all
    n = len(hub.requests())
    again = pub(hub, rep, f"{TARGET}/cfg")
    assert again.commit is None and again.deleted == [] and writes(hub, n) == []
    assert "up to date" in again.line()


def test_outputs_of_one_job_never_delete_each_others_files(hub, kernels, tmp_path):
    """As a job's publish stage does: the kernel, results.json and the report published
    into one repo by separate publishes; each deletes only its own stale files."""
    ka, kb = kernels
    wd = tmp_path / "wd"
    shutil.copytree(ka, wd / "kernel")
    (wd / "results.json").write_text('{"runs": 8}\n')
    report(wd / "report", ["a.png", "b.png"])
    for what in ("kernel", "results.json", "report"):
        pub(hub, wd / what, create=True)
    first = hub.files(REPO)
    kernel_a = {p for p in first if p.startswith("kernel/")}

    (wd / "report" / "b.png").unlink()
    s = pub(hub, wd / "report")
    assert s.deleted == ["report/b.png"]
    assert kernel_a | {"results.json"} <= set(hub.files(REPO))

    shutil.rmtree(wd / "kernel")
    shutil.copytree(kb, wd / "kernel")
    kernel_b = {f"kernel/{p.relative_to(wd / 'kernel').as_posix()}"
                for p in (wd / "kernel").rglob("*") if p.is_file()
                and not any(x.startswith(".") and x != ".done"
                            for x in p.relative_to(wd / "kernel").parts)}
    assert kernel_a - kernel_b  # the tilings differ in chunk files
    s = pub(hub, wd / "kernel")
    served = hub.files(REPO)
    assert sorted(s.deleted) == sorted(kernel_a - kernel_b)
    assert {p for p in served if p.startswith("kernel/")} == kernel_b
    assert {"report/a.png", "report/index.html", "report/report.json",
            "results.json"} <= set(served)
    for what in ("kernel", "results.json", "report"):
        assert pub(hub, wd / what).commit is None


def test_without_a_record_nothing_is_deleted(hub, tmp_path):
    """A repo published before kernelscale kept a record (or by hand): nothing deleted."""
    rep = report(tmp_path / "report", ["a.png"])
    commit_files(hub, tmp_path, {"report/old.png": b"old", "report/a.png": b"older a"})
    s = pub(hub, rep)
    served = hub.files(REPO)
    assert s.deleted == [] and served["report/old.png"] == b"old"
    assert served["report/a.png"] == (rep / "a.png").read_bytes()
    assert set(json.loads(served[MANIFEST])["outputs"]) == {"report"}


def test_a_record_kernelscale_did_not_write_is_kept_and_deletes_nothing(hub, tmp_path):
    rep = report(tmp_path / "report", ["a.png", "old.png"])
    pub(hub, rep, create=True)
    theirs = b'{"outputs": {"report": {}}}\n'
    commit_files(hub, tmp_path, {MANIFEST: theirs})
    (rep / "old.png").unlink()
    s = pub(hub, rep)
    served = hub.files(REPO)
    assert s.deleted == [] and "report/old.png" in served and served[MANIFEST] == theirs
    assert any("not kernelscale's record" in n for n in s.notes)


def test_a_tampered_record_never_deletes_unknown_files(hub, tmp_path):
    rep = report(tmp_path / "report", ["a.png"])
    pub(hub, rep, create=True)
    commit_files(hub, tmp_path, {"report/theirs.png": b"theirs", "outside.txt": b"out",
                                 "report/x.png": b"x"})
    head = hub.repos[REPO].commits[hub.repos[REPO].refs["main"]]
    doc = json.loads(hub.files(REPO)[MANIFEST])
    entry = doc["outputs"]["report"]
    like = entry["report/a.png"]
    # a foreign file listed with made-up hashes, one outside the output with its true ones
    entry["report/theirs.png"] = {**like, "size": 6}
    o = head["outside.txt"]
    entry["outside.txt"] = {"size": o.size, "sha256": o.sha256, "git_oid": o.git_oid}
    # another output's entry, malformed, naming a file of the repo
    doc["outputs"]["report/x.png"] = {"report/x.png": {"size": "1"}}
    commit_files(hub, tmp_path, {MANIFEST: json.dumps(doc).encode()})
    s = pub(hub, rep)
    served = hub.files(REPO)
    assert s.deleted == []
    assert {"report/theirs.png", "outside.txt", "report/x.png"} <= set(served)
    assert any("report/theirs.png: changed on the Hub" in n for n in s.notes)
    assert any("malformed" in n for n in s.notes)
    rec = Record.load(served[MANIFEST].decode())
    assert set(rec.outputs) == {"report"}  # rewritten from what was published


def test_a_file_changed_on_the_hub_since_is_kept(hub, tmp_path):
    rep = report(tmp_path / "report", ["a.png", "old.png"])
    pub(hub, rep, create=True)
    commit_files(hub, tmp_path, {"report/old.png": b"edited by someone"})
    (rep / "old.png").unlink()
    s = pub(hub, rep)
    assert s.deleted == [] and hub.files(REPO)["report/old.png"] == b"edited by someone"


# ------------------------------------------------------------------------- record

def test_record_round_trip_and_scope():
    files = [LocalFile("cfg/kernel/zarr.json", data=b"{}").hash(),
             LocalFile("cfg/kernel/c/0", data=b"\0\1").hash()]
    rec = Record().with_output("cfg/kernel", files)
    back = Record.load(rec.to_bytes().decode())
    assert back.outputs == rec.outputs and back.to_bytes() == rec.to_bytes()
    assert under("cfg/kernel/c/0", "cfg/kernel") and under("x", "")
    assert not under("cfg/kernelx/c/0", "cfg/kernel") and not under("cfg", "cfg/kernel")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=3)
                              | st.dictionaries(st.text(max_size=8), c, max_size=3),
                              max_leaves=12).map(
                     lambda o: json.dumps({"kernelscale_published": 1, "outputs": o}))))
def test_any_text_is_a_record_or_refused_never_an_error(text):
    rec = Record.load(text)
    if rec is not None:
        for files in rec.outputs.values():
            assert all(r.size >= 0 and len(r.sha256) == 64 for r in files.values())
