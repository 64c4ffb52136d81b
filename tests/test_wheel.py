"""Packaging: the bundled job lookup, and the wheel installed into a fresh venv.

The slow tests build the wheel from a copy of the source tree (so no ``build/`` folder of
the checkout, stale or not, leaks into it), install it with ``--no-deps`` into a new venv
that borrows its dependencies from the running interpreter's site-packages through a
plain ``.pth`` path line (torch is not reinstalled; the editable install's finder there is
not activated), and run the ``kernelscale`` command from an unrelated directory: the
bundled jobs and sbatch templates must come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kernelscale.bundled import BUNDLED_JOBS, TEMPLATES, bundled_jobs, job_path
from kernelscale.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kernelscale"
DATA_GLOBS = ("jobs/*.toml", "slurm/templates/*.sbatch.in")
SCRIPTS = ("ingest.sbatch", "kernel-array.sbatch", "gather.sbatch")


# --------------------------------------------------------------------------- lookup

def test_bundled_jobs_are_the_package_job_files():
    names = bundled_jobs()
    assert {"demo", "demo-slurm"} <= set(names)
    assert names == sorted(p.stem for p in BUNDLED_JOBS.glob("*.toml"))
    assert sorted(p.name for p in TEMPLATES.glob("*.sbatch.in")) == sorted(
        f"{s}.in" for s in SCRIPTS)


def test_job_path_default_is_the_bundled_demo(capsys):
    assert job_path(None) == BUNDLED_JOBS / "demo.toml"
    assert job_path(None).is_file()
    assert capsys.readouterr().err == ""


def test_job_path_existing_file_is_itself(tmp_path, monkeypatch, capsys):
    own = tmp_path / "demo.toml"  # same name as a bundled job: the file wins
    own.write_text('[job]\nname = "mine"\n')
    assert job_path(str(own)) == own
    monkeypatch.chdir(tmp_path)
    assert job_path("demo.toml") == Path("demo.toml")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("arg", ["demo-slurm", "demo-slurm.toml", "jobs/demo-slurm.toml"])
def test_job_path_falls_back_to_a_bundled_job(arg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    want = BUNDLED_JOBS / "demo-slurm.toml"
    assert job_path(arg) == want
    err = capsys.readouterr().err
    assert err == f"kernelscale: using the bundled job {want}\n"


@pytest.mark.parametrize("arg", ["nope", "jobs/nope.toml", "demo.yaml", "", "..", "jobs",
                                 "/nowhere/demo-slurm.toml", "other/demo.toml",
                                 "jobs/demo-slurm"])
def test_job_path_unknown_names_the_bundled_jobs(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()  # a folder is not a job file
    with pytest.raises(ConfigError) as e:
        job_path(arg)
    msg = str(e.value)
    assert msg.startswith(f"{arg}: no such job file (bundled jobs: ")
    assert "demo, demo-slurm" in msg


# --------------------------------------------------------------------------- wheel

def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


class Installed:
    def __init__(self, wheel: Path, venv: Path, elsewhere: Path, env: dict):
        self.wheel, self.venv, self.elsewhere, self.env = wheel, venv, elsewhere, env
        self.python = venv / "bin" / "python"
        self.kernelscale = venv / "bin" / "kernelscale"

    def run(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run([self.kernelscale, *args], self.elsewhere, self.env, timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    pytest.importorskip("setuptools", minversion="77",
                        reason="building without isolation needs setuptools>=77 here")
    tmp = tmp_path_factory.mktemp("wheel")
    env = _clean_env()

    # the source tree as a fresh copy: pyproject, readme, licence and the package, nothing built
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "kernelscale",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", dist, src], tmp, env)
    (wheel,) = dist.glob("kernelscale-*.whl")

    # a fresh venv; its dependencies are this interpreter's, by a plain path line
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp, env)
    vpy = venv / "bin" / "python"
    purelib = _run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp, env).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert deps, "no site-packages to borrow the dependencies from"
    (Path(purelib) / "_kernelscale_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([vpy, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, venv, elsewhere, env)


@pytest.mark.slow
def test_wheel_ships_the_package_and_its_data(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, f"missing modules: {sorted(modules - names)}"
    data = {p.relative_to(ROOT).as_posix() for g in DATA_GLOBS for p in PACKAGE.glob(g)}
    assert {"kernelscale/jobs/demo.toml", "kernelscale/jobs/demo-slurm.toml",
            "kernelscale/slurm/templates/kernel-array.sbatch.in"} <= data
    assert data <= names, f"missing data files: {sorted(data - names)}"
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/", "jobs/"))}

    assert "License-Expression: MIT" in meta.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: torch") for r in requires)
    pinned = [r for r in requires if "==" in r.split(";")[0]]
    assert not pinned, f"dependencies are ranges, not pins: {pinned}"


@pytest.mark.slow
def test_wheel_imports_from_the_new_venv(installed):
    code = ("import kernelscale, kernelscale.cli, kernelscale.bundled as b, torch; "
            "print(kernelscale.__file__); print(b.BUNDLED_JOBS); print(b.TEMPLATES); "
            "print(torch.__file__)")
    out = _run([installed.python, "-c", code], installed.elsewhere, installed.env)
    pkg, jobs, templates, torch_file = (Path(x) for x in out.stdout.split("\n")[:4])
    venv = installed.venv.resolve()
    for p in (pkg, jobs, templates):
        assert p.resolve().is_relative_to(venv), f"{p} is not from the wheel"
    assert not torch_file.resolve().is_relative_to(venv), "torch was reinstalled"
    assert (jobs / "demo.toml").is_file()
    assert (templates / "gather.sbatch.in").is_file()


@pytest.mark.slow
def test_wheel_help(installed):
    out = installed.run("--help").stdout
    assert "submit" in out and "run" in out
    out = _run([installed.python, "-m", "kernelscale", "--help"], installed.elsewhere,
               installed.env).stdout
    assert "submit" in out


@pytest.mark.slow
def test_wheel_submit_dry_run_uses_the_bundled_job_and_templates(installed):
    workdir = installed.elsewhere.parent / "slurm-run"
    p = installed.run("submit", "jobs/demo-slurm.toml", "--dry-run", "--workdir", workdir)
    headers = [line for line in p.stdout.splitlines() if line.startswith("==> ")]
    assert len(headers) == 3, p.stdout
    for header, script in zip(headers, SCRIPTS, strict=True):
        assert header.startswith(f"==> {workdir / 'slurm' / script}"), header
    bundled = installed.venv.resolve()
    assert "kernelscale: using the bundled job " in p.stderr
    line = next(x for x in p.stderr.splitlines() if "using the bundled job" in x)
    assert Path(line.rsplit(" ", 1)[1]).resolve().is_relative_to(bundled), line


@pytest.mark.slow
def test_wheel_runs_the_bundled_demo_by_default(installed):
    """Plain `kernelscale run` in an unrelated directory: the bundled demo, its files in
    that directory's demo-out/."""
    p = installed.run("run", timeout=600)
    assert p.stderr.splitlines()[0] == "job demo: workdir demo-out"
    workdir = installed.elsewhere / "demo-out"
    assert (workdir / "results.json").is_file()
    assert (workdir / "report" / "index.html").is_file()
