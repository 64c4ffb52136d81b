"""Every value parser and formatter of the project: sizes, shapes, ranges, times, lists.

Job files and command-line options hold text (``"40G"``, ``"500x1024"``, ``"0:2048"``);
the configuration layer turns it into numbers with these functions when the job or the
options are read, so nothing below it ever parses a string. Each parser raises
:class:`~kernelscale.errors.ConfigError` naming the option and the form it expects.

Byte sizes follow dask's conventions (``dask.utils.parse_bytes``): decimal prefixes for
``k``/``M``/``G`` (``40G`` = 40e9 bytes), binary ones for ``KiB``/``MiB``/``GiB``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import ConfigError

_PAIR = re.compile(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*")
_SHAPE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*")
_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_bytes(text: str | int, what: str = "size") -> int:
    """``'8G'`` -> 8_000_000_000, ``'512MiB'`` -> 536_870_912, ``'1e9'``; must be > 0."""
    from dask.utils import parse_bytes as dask_parse_bytes

    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        try:
            n = int(dask_parse_bytes(str(text)))
        except (ValueError, TypeError):
            raise ConfigError(f"{what} {text!r}: cannot read it as a size (e.g. 40G, "
                              "512MiB, 2e9)") from None
    if n <= 0:
        raise ConfigError(f"{what} {text!r}: must be positive")
    return n


def format_bytes(n: float) -> str:
    """``123456789`` -> ``'117.74 MiB'`` (dask's binary units)."""
    from dask.utils import format_bytes as dask_format_bytes

    return str(dask_format_bytes(int(n)))


def parse_pair(text: str, what: str) -> tuple[int, int]:
    """``'500x1024'`` -> (500, 1024): a tile or chunk shape, both positive."""
    m = _PAIR.fullmatch(str(text))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ConfigError(f"{what} {text!r}: expected ROWSxCOLS of positive numbers, "
                          "e.g. 1024x4096")
    return int(m.group(1)), int(m.group(2))


def parse_shape(text: str, what: str = "shape") -> tuple[int, int, int]:
    """``'10000x50000x10'`` -> (n_test, n_train, classes)."""
    m = _SHAPE.fullmatch(str(text))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ConfigError(f"{what} {text!r}: expected N_TESTxN_TRAINxCLASSES, e.g. "
                          "10000x50000x10")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``'0:2048'`` -> (0, 2048), START < STOP."""
    m = _RANGE.fullmatch(str(text))
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"{what} {text!r}: expected START:STOP with START < STOP")
    return int(m.group(1)), int(m.group(2))


def parse_int_list(text: str | Sequence[int], what: str) -> tuple[int, ...]:
    """``'0,3,7'`` (or a list) -> (0, 3, 7)."""
    items = str(text).split(",") if isinstance(text, str) else list(text)
    try:
        out = tuple(int(str(x).strip()) for x in items if str(x).strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers") from None
    if not out:
        raise ConfigError(f"{what} {text!r}: empty list")
    return out


def parse_run_counts(text: str | Sequence[int | str], what: str = "runs"
                     ) -> tuple[int | str, ...]:
    """``'10,20,50,all'`` -> (10, 20, 50, 'all'): run counts of a curve, each >= 2."""
    items = str(text).split(",") if isinstance(text, str) else list(text)
    out: list[int | str] = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if s == "all":
            out.append("all")
            continue
        try:
            n = int(s)
        except ValueError:
            raise ConfigError(f"{what}: {s!r} is not a number of runs (or 'all')") from None
        if n < 2:
            raise ConfigError(f"{what}: {n} runs; a kernel needs at least 2")
        out.append(n)
    if not out:
        raise ConfigError(f"{what}: no run counts given")
    return tuple(out)


def parse_slurm_time(text: str, what: str = "time") -> int | None:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds; None: no limit."""
    s = str(text).strip()
    if s.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME.match(s)
    if not m:
        raise ConfigError(f"{what} {text!r}: expected a Slurm time such as 04:00:00 or "
                          "1-12:00")
    d, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is None:  # M | M:S | H:M:S
        h, mi, sec = (0, a, b or 0) if c is None else (a, b, c)
    else:  # D-H | D-H:M | D-H:M:S
        h, mi, sec = a, b or 0, c or 0
    return (((d or 0) * 24 + h) * 60 + mi) * 60 + sec


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``'1:02:05'``; under a minute ``'12.3s'``."""
    if seconds != seconds or seconds < 0:  # NaN or negative: unknown
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def round_floats(obj, digits: int = 6):
    """A copy of a JSON-able object with every float rounded to ``digits`` significant
    digits, so a written ``85.39999999999999`` reads ``85.4``."""
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            return obj
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    return obj
