"""The ``kernelscale`` command line.

Every user error is a :class:`~kernelscale.errors.KernelscaleError`: printed as one line
``kernelscale: error: ...`` and a non-zero exit status (2; 75 for a stage that stopped on
a signal after checkpointing, so a batch wrapper can requeue it). The options are
declared in :mod:`kernelscale.cli_parser`; the commands that turn them into stage tables
and run the stages are in :mod:`kernelscale.cli_commands`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings

from .cli_parser import build_parser
from .errors import Interrupted, KernelscaleError


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *_: f"kernelscale: warning: {m}\n"


#: Set (unless already set) for every ``kernelscale`` process before numpy loads OpenBLAS,
#: which reads it once: its threads sleep as soon as a call ends instead of spinning for
#: 2^28 cycles (~0.1 s) on the cores the kernel's next normalisation needs (on 2 cores:
#: 2.5 s of normalisation in a 20,000-run kernel, against 4.2 s with the spinning).
BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def command() -> int:
    """The ``kernelscale`` program (and ``python -m kernelscale``): :data:`BLAS_ENV`,
    :func:`main`, then an exit that skips collecting what the process imported."""
    for k, v in BLAS_ENV.items():
        os.environ.setdefault(k, v)
    rc = main()
    # Every object alive now lives until the process ends. Frozen, they are left out of
    # the interpreter's final collection, which otherwise takes ~0.4 s of every exit
    # once torch is imported (measured on 2 cores: 0.18 s against 0.56-0.79 s).
    gc.freeze()
    return rc


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return rc
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _os_error_line(e: OSError) -> str:
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "free space and re-run the same command: what was committed "
                          "is kept and the rest resumes",
            errno.EDQUOT: "free quota and re-run the same command: what was committed is "
                          "kept and the rest resumes",
            errno.EACCES: "check the permissions of the folder",
            errno.EPERM: "check the permissions of the folder",
            errno.EROFS: "the file system is read-only; choose a writable location"}.get(
                e.errno)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _quiet_abandoned_tasks() -> None:
    """After the error line, the process only exits. A read that failed inside Zarr's
    event loop (a corrupt chunk) leaves that loop's other reads pending; asyncio logs
    each such task as it is destroyed at exit, which would bury the one error line under
    tracebacks of reads nobody waits for."""
    logging.getLogger("asyncio").disabled = True


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging(args.verbose)
    if args.command == "kernel":
        from .signals import catch_signals_early

        catch_signals_early()
    try:
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KernelscaleError as e:
        print(f"kernelscale: error: {e}", file=sys.stderr)
        _quiet_abandoned_tasks()
        return e.exit_code
    except BrokenPipeError:
        raise
    except OSError as e:  # the file system said no: one line, what it was and what to do
        print(f"kernelscale: error: {_os_error_line(e)}", file=sys.stderr)
        _quiet_abandoned_tasks()
        return 74  # EX_IOERR
    except KeyboardInterrupt:
        print("kernelscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
