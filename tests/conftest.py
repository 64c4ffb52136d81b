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
    """Run ``python -m kernelscale -q ARGS`` as a process of its own; return its
    CompletedProcess (text stdout and stderr).

    The process is forked from a :mod:`tests.cliserver` of this worker that has imported
    torch, numpy and Zarr once, in the environment ``env`` gives those imports (e.g.
    ``OMP_NUM_THREADS=1``): one server per such environment, a few at most, the rest
    plain subprocesses."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "kernelscale", "-q", *args]
    server = _cli_server(e)
    p = server.run(cmd, e, timeout) if server is not None else None
    if p is None:
        import subprocess

        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kernelscale {' '.join(args)} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


class _CliServer:
    """A fork server of this worker (:mod:`tests.cliserver`) for one environment of the
    imports; stopped when the worker exits, and stops itself if the worker dies."""

    def __init__(self, env: dict):
        import atexit
        import select
        import subprocess
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="ks-cli-"))
        self.path = str(self.dir / "socket")
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cliserver.py"),
                                      self.path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, env=self.env)
        atexit.register(self.close)
        # ready once its imports are done (seconds); a server that hangs is not waited for
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        self.ready = bool(ready) and self.proc.stdout.readline().strip() == b"ready"

    def run(self, cmd: list[str], env: dict, timeout: float):
        """The command's CompletedProcess, or None where the server is gone."""
        import contextlib
        import json
        import signal
        import socket
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory(dir=self.dir) as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                try:
                    s.connect(self.path)
                except OSError:  # the server is gone: the caller runs a plain subprocess
                    self.ready = False
                    return None
                s.sendall(json.dumps({"args": cmd[3:], "env": env, "cwd": os.getcwd(),
                                      "stdout": str(out), "stderr": str(err)}).encode()
                          + b"\n")
                answer = s.makefile("rb")
                pid = int(answer.readline())
                try:
                    code = int(answer.readline())
                except BaseException as e:
                    # as subprocess.run: the command does not outlive a call that failed
                    # (a timeout, Ctrl-C, the handler gone)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    if not isinstance(e, TimeoutError):
                        raise
                    s.settimeout(None)
                    s.makefile("rb").readline()  # the handler saw the child end
                    raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(),
                                                    err.read_text()) from None
            return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())

    def close(self) -> None:
        import shutil

        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


#: this worker's fork servers by the environment their imports saw
_SERVERS: dict[tuple, _CliServer] = {}
MAX_SERVERS = 3


def _cli_server(env: dict) -> _CliServer | None:
    """The fork server for a command of environment ``env``, started on first use; None
    where it did not start or too many run already."""
    from tests.cliserver import IMPORT_TIME

    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME)))
    if key not in _SERVERS:
        if len(_SERVERS) >= MAX_SERVERS:
            return None
        _SERVERS[key] = _CliServer(env)
    return _SERVERS[key] if _SERVERS[key].ready else None
