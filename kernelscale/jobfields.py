"""How a field of a job table is declared, read, checked and written back.

A table (:mod:`kernelscale.jobtables`) is a dataclass; a field whose text stands for a
value (``max_memory = "40G"``) is declared with :func:`parsed`, which keeps the parser
and the writer of its text in the field's metadata. :func:`table_from_options` builds a
table from a job file's table or from command-line options, parsing those fields and
type-checking the others against their annotations; :func:`flag_of` and
:func:`table_flags` give the command-line options of a table (the Slurm scripts render
the ``[kernel]`` table as ``kernelscale kernel`` options).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field, fields
from typing import Any, get_type_hints

from .errors import ConfigError


def parsed(parse: Callable[[Any, str], Any], default: Any = None, *,
           show: Callable[[Any], Any] = str, flag: str | None = None) -> Any:
    """A field whose value is parsed on load by ``parse(value, where)``; ``show`` writes
    a parsed value back as the job file's value (text, or a list of text), ``flag`` is its
    command-line name when that is not ``--`` + the field name with ``-`` for ``_``."""
    meta: dict[str, Any] = {"parse": parse, "show": show}
    if flag:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


def negated(default: bool, flag: str) -> Any:
    """A boolean field whose command-line option ``flag`` sets it to ``not default``."""
    return field(default=default, metadata={"flag": flag, "negated": True})


def show_x(v: Any) -> str:
    return "x".join(map(str, v))


def show_colon(v: Any) -> str:
    return ":".join(map(str, v))


def show_comma(v: Any) -> str:
    return ",".join(map(str, v))


def show_size(n: int) -> str:
    """Bytes as the shortest exact size text :func:`~kernelscale.units.parse_bytes`
    reads: 40000000000 -> "40G", 2**31 -> "2GiB", 12345 -> "12345"."""
    for unit, scale in (("T", 10**12), ("TiB", 2**40), ("G", 10**9), ("GiB", 2**30),
                        ("M", 10**6), ("MiB", 2**20), ("k", 10**3), ("KiB", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def flag_of(cls: type, name: str) -> str:
    """The command-line option of field ``name`` of table ``cls``."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def table_flags(table: Any, skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The command-line options that reproduce ``table`` (its fields that differ from the
    defaults, in field order) as (flag, value) pairs; ``True`` for a bare flag."""
    out: list[tuple[str, Any]] = []
    for f in fields(table):
        value = getattr(table, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = flag_of(type(table), f.name)
        if f.metadata.get("negated"):
            out.append((flag, not value))
        elif isinstance(value, bool):
            out.append((flag, value))
        elif "show" in f.metadata and value is not None:
            out.append((flag, f.metadata["show"](value)))
        elif isinstance(value, float):
            out.append((flag, f"{value:g}"))
        else:
            out.append((flag, value))
    return out


def _check_type(label: str, value: Any, hint: Any) -> Any:
    allowed = getattr(hint, "__args__", None) or (hint,)
    allowed = tuple(getattr(a, "__origin__", a) for a in allowed if a is not type(None))
    if value is None:
        return value
    for a in allowed:
        if a is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if a is int and isinstance(value, bool):
            continue
        if isinstance(value, a):
            return value
    names = " or ".join(a.__name__ for a in allowed)
    raise ConfigError(f"{label} must be {names}, got {type(value).__name__} {value!r}")


def table_from_options(cls: type, data: Mapping[str, Any], where: str,
                       option: Callable[[str], str] | None = None) -> Any:
    """Build table ``cls`` from a mapping (a TOML table, or command-line options).

    Unknown keys are an error; parsed fields (sizes, shapes, ranges, times) are parsed
    here, every other value is type-checked against the field's annotation. Messages
    name a value as ``option(key)`` (the command line: ``--max-memory``), else as
    ``WHERE key 'KEY'``.
    """
    label = option or (lambda key: f"{where} {key}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join(sorted(by_name))})")
    kwargs = {}
    for key, value in data.items():
        parse = by_name[key].metadata.get("parse")
        if parse is not None and value is not None:
            kwargs[key] = parse(value, label(key))
        else:
            kwargs[key] = _check_type(label(key), value, hints[key])
    return cls(**kwargs)
