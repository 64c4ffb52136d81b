from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reference import random_source  # noqa: E402

_FAULTS: dict[str, str] = {}


def pytest_runtest_logreport(report):
    """Collect the verdict of every fault-injection case (marker ``fault``)."""
    if "fault" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _FAULTS[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    """The fault suite's table: one line per case with its verdict, and the totals."""
    if not _FAULTS:
        return
    tr = terminalreporter
    tr.section("fault suite")
    for nodeid, outcome in _FAULTS.items():
        tr.write_line(f"{outcome.upper():8s} {nodeid}")
    counts = {o: list(_FAULTS.values()).count(o) for o in ("passed", "failed", "skipped")}
    tr.write_line(f"fault suite: {len(_FAULTS)} case(s), {counts['passed']} passed, "
                  f"{counts['failed']} failed, {counts['skipped']} skipped")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_source(tmp_path):
    """Three files of 7, 8, 9 runs; returns (dir, test, train) with float16 arrays."""
    src = tmp_path / "src"
    test, train = random_source(src, [7, 8, 9])
    return src, test, train


@pytest.fixture
def small_store(tmp_path, small_source):
    src, test, train = small_source
    store = tmp_path / "store"
    ingest_dir(src, store, run_chunk=4, show_progress=False)
    return store, test, train


def ingest_dir(src, store, preparer=None, **kw):
    """Ingest the folder ``src`` into ``store`` (``kw``: fields of IngestConfig)."""
    from kernelscale.ingestion import IngestConfig, ingest

    return ingest(IngestConfig(src, store, **kw), preparer=preparer)


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 300):
    """Run ``python -m kernelscale ARGS`` in a subprocess; return CompletedProcess."""
    import subprocess

    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-m", "kernelscale", "-q", *args], capture_output=True,
                       text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kernelscale {' '.join(args)} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p
