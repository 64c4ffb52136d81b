"""The command line's habits: global options anywhere, no abbreviations, help with
defaults, bare command prints help, a closed pipe ends quietly, values parsed once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kernelscale.cli import build_parser, main
from tests.conftest import ROOT, run_cli


def test_global_options_before_or_after_the_command():
    p = build_parser()
    for argv in (["-q", "info", "x"], ["info", "x", "-q"], ["info", "-q", "x"]):
        a = p.parse_args(argv)
        assert a.quiet is True and a.command == "info", argv
    a = p.parse_args(["info", "x"])
    assert a.quiet is False and a.verbose == 0
    assert p.parse_args(["-v", "info", "x"]).verbose == 1
    assert p.parse_args(["info", "x", "-vv"]).verbose == 2


def test_version_anywhere(capsys):
    for argv in (["--version"], ["info", "--version"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert capsys.readouterr().out.strip().startswith("kernelscale ")


def test_no_abbreviations(capsys):
    with pytest.raises(SystemExit) as e:
        main(["kernel", "--stor", "s", "--out", "k"])
    assert e.value.code == 2
    assert "required: --store" in capsys.readouterr().err  # --stor is not --store


def test_bare_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: kernelscale" in out and "ingest" in out and "submit" in out


def test_help_shows_defaults_and_every_option_has_help():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, type(p._subparsers._group_actions[0])))
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"
    text = sub.choices["kernel"].format_help()
    assert "(default: test-train)" in text and "(default: 600.0)" in text
    assert "(default: 0)" in sub.choices["evaluate"].format_help()  # --seed


def test_a_closed_pipe_ends_quietly(small_store):
    """The reader closes its end before kernelscale writes: no traceback, status 141."""
    store, *_ = small_store
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "kernelscale", "info", str(store)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert err == ""


def test_bad_values_are_one_line_naming_the_option(tmp_path):
    p = run_cli("kernel", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "k"),
                "--max-memory", "lots", check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == ("kernelscale: error: --max-memory 'lots': cannot read it as a "
                                "size (e.g. 40G, 512MiB, 2e9)")
    p = run_cli("kernel", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "k"),
                "--tile", "12", check=False)
    assert p.returncode == 2 and "--tile '12': expected ROWSxCOLS" in p.stderr
    assert not (tmp_path / "k").exists()
    p = run_cli("kernel", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "k"),
                "--class", "1,x", check=False)
    assert p.returncode == 2 and "--class '1,x': expected comma-separated" in p.stderr


def test_outputs_that_are_files_are_refused(tmp_path, small_store):
    store, *_ = small_store
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for args in (["kernel", "--store", str(store), "--out", str(afile)],
                 ["ingest", str(tmp_path / "src"), "--store", str(afile)],
                 ["curve", "--store", str(store), "--labels", str(afile), "--runs", "4",
                  "--out", str(afile)],
                 ["info", str(tmp_path / "nothing")]):
        p = run_cli(*args, check=False)
        assert p.returncode == 2, args
        (line,) = p.stderr.strip().splitlines()
        assert line.startswith("kernelscale: error: "), line
        assert "Traceback" not in p.stderr
    assert afile.read_text() == "mine"


def test_failed_kernel_validation_leaves_no_output(small_store, tmp_path):
    store, *_ = small_store
    out = tmp_path / "k"
    p = run_cli("kernel", "--store", str(store), "--out", str(out), "--device", "cpu",
                "--chunks", "8x32", "--tile", "8x32", "--max-memory", "100", check=False)
    assert p.returncode == 2 and "over the memory budget" in p.stderr
    assert not out.exists()
    p = run_cli("kernel", "--store", str(store), "--out", str(out), "--device", "cpu",
                "--chunks", "8x32", "--rows", "3:8", check=False)
    assert p.returncode == 2 and "chunk grid" in p.stderr
    assert not out.exists()


ABANDONED = r'''
import asyncio, atexit, gc, sys
from kernelscale import cli_commands
from kernelscale.cli import main
from kernelscale.errors import BadInputError

def failing(a):
    # as a Zarr read that failed on one chunk: the loop's other reads stay pending and
    # are destroyed when the process exits
    loop = asyncio.new_event_loop()
    pending = [loop.create_task(asyncio.sleep(10)) for _ in range(3)]
    loop.run_until_complete(asyncio.sleep(0))  # the reads have started
    def destroy():
        loop.close()
        pending.clear()
        gc.collect()
    atexit.register(destroy)
    raise BadInputError("x.zarr[runs 0:3]: cannot read 'logits' (checksum mismatch)")

cli_commands.cmd_info = failing
sys.exit(main(["info", "x"]))
'''


def test_the_error_line_is_not_followed_by_reads_abandoned_in_the_background():
    p = subprocess.run([sys.executable, "-c", ABANDONED], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "kernelscale: error: x.zarr[runs 0:3]: cannot read 'logits' (checksum mismatch)"], \
        p.stderr


def test_the_program_sets_its_blas_environment_before_numpy_loads():
    """The command's module imports no numpy, so the variables that OpenBLAS reads once
    are in place before it loads; a value the user set is kept."""
    from kernelscale.cli import BLAS_ENV

    code = ("import os, sys\n"
            "import kernelscale.cli as c\n"
            "assert 'numpy' not in sys.modules, 'numpy loaded with the command module'\n"
            "sys.argv = ['kernelscale', '--version']\n"
            "try:\n    c.command()\nexcept SystemExit:\n    pass\n"
            "print(repr({k: os.environ.get(k) for k in c.BLAS_ENV}))\n")
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == repr(BLAS_ENV)
    key = next(iter(BLAS_ENV))
    out = subprocess.run([sys.executable, "-c", code], env={**env, key: "30"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == repr({key: "30"})
