"""The GPU check script runs on the CPU at small shapes: every correctness and resume
check passes, and every section runs (the speed goals are judged only on a GPU)."""

import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_on_the_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device",
                        "cpu", "--small", "--runs", "600", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for line in ("PASS cpu fp32 vs float64", "PASS SIGUSR1 then resume",
                 "PASS SIGKILL then resume", "gpu_check: 0 FAIL(s)"):
        assert line in out, out
    for sec in ("== 0 device", "== 1 correctness", "== 2 resume", "== 3 out of memory",
                "== 5 n=500", "== 4 speed"):
        assert sec in out
    assert "warm fp32:" in out and "published method: whole process" in out
