"""A fork server for the tests' ``kernelscale`` commands.

Each command a test runs with :func:`tests.conftest.run_cli` is a process of its own, as
a user's would be; starting Python and importing torch, numpy and Zarr takes ~2 s of
that on two cores, most of a small command's time. One server per test worker imports
them once, then forks a child per command, which runs ``python -m kernelscale ARGS`` at
the top level of its own interpreter: its own environment, folder, stdout and stderr
files, signal dispositions, exit code and interpreter exit (threads joined, ``atexit``
run). Only the three libraries' import-time state is the server's, so a command goes to
a server started with the same values of the variables those imports read (see
:data:`IMPORT_TIME`; :func:`tests.conftest.run_cli`).

Protocol, one command per connection: the client sends one JSON line ``{"args",
"env", "cwd", "stdout", "stderr"}`` (the last two: paths of files to write); the server
answers the child's pid on one line, then its exit code (negative: the signal that
ended it) on another.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import sys
import tempfile

#: Prefixes of environment variables read when torch, numpy or Zarr are imported (or by
#: the interpreter at start-up): a command shares the imports of a server only where
#: these are the same in both environments.
IMPORT_TIME = ("PYTHON", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS", "GOTO",
               "NUMPY", "ZARR", "NUMCODECS", "LD_", "CUDA", "NVIDIA", "GOMP")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve(path: str) -> dict:
    """Accept commands on the Unix socket ``path`` until killed; returns only in a
    forked child, with its command."""
    # What the imports print (a warning) would reach a plain command's stderr, but only
    # the server's here: caught, and then the server refuses (its commands would differ).
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            import numpy  # noqa: F401 -- imported once here, inherited by every command

            # fork() copies only the calling thread. numpy's OpenBLAS starts its workers
            # at import and starts them again in a forked child (its pthread_atfork
            # handlers); any other thread would be missing in the children: then the
            # server refuses.
            blas = _threads()
            import torch  # noqa: F401
            import zarr  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        wrote = caught.seek(0, os.SEEK_END)
    if wrote:
        print("not ready: the imports wrote to stderr", flush=True)
        sys.exit(1)
    if _threads() != blas:
        print(f"not ready: {_threads() - blas} thread(s) started by torch or Zarr",
              flush=True)
        sys.exit(1)
    # the imports' objects live as long as the server: kept out of the children's
    # collections, which would otherwise copy every page they touch (0.76 s against
    # 0.34 s for a child that only exits)
    gc.freeze()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    # the handlers below are reaped by the kernel: no zombie, no wait in the loop
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    parent = os.getppid()
    srv.settimeout(5.0)
    while True:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test worker is gone: so is its server
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                sys.exit(0)
            continue
        conn.settimeout(None)
        if os.fork() != 0:
            conn.close()
            continue
        # the handler of one command: fork its child, report the pid, wait, report
        srv.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        req = json.loads(conn.makefile("r").readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            return req
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()
        os._exit(0)


def _become(req: dict) -> None:
    """Turn this forked child into the process of ``req``'s command."""
    import numpy

    for fd, name, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(name, flags, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    # numpy's global generator is seeded from the OS at import: a new process's differs,
    # so the child draws a fresh one (Python's reseeds itself at fork; torch's starts from
    # a fixed seed in every process, the server's untouched one included)
    numpy.random.seed()
    sys.argv = ["-m", *req["args"]]
    # `python -m` puts the working folder first on the path, where this script's folder is
    sys.path[0] = os.getcwd()


if __name__ == "__main__":
    command = _serve(sys.argv[1])
    _become(command)
    import runpy

    # At the top level: the command's SystemExit ends this interpreter as it ends
    # `python -m kernelscale`, threads joined and atexit handlers run.
    runpy.run_module("kernelscale", run_name="__main__", alter_sys=True)
