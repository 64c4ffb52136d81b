"""Progress reporting: a tqdm bar on a terminal, plain timestamped lines otherwise.

Batch logs (Slurm, CI) should not fill with carriage returns, so when stderr is not a
terminal the bar becomes a line every ``interval`` seconds plus one at the end, each
with the wall-clock time, the count, the rate and the time left::

    2026-11-26T12:00:03 [ingest] 1.17 GiB/2.34 GiB  50.0%  41.2s  29.1 MiB/s  ETA 41.2s
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from .units import format_bytes, format_duration


class PlainProgress:
    """Minimal tqdm-compatible progress that prints whole lines to stderr."""

    def __init__(self, total: float | None, desc: str, unit: str, interval: float = 10.0,
                 unit_scale: bool = False) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0.0
        self.interval = interval
        self.unit_scale = unit_scale
        self._start = time.monotonic()
        self._last = self._start
        self.postfix = ""

    def _fmt(self, v: float) -> str:
        if self.unit == "B":
            return format_bytes(v)
        if self.unit_scale:
            for prefix in ("", "k", "M", "G", "T"):
                if abs(v) < 1000:
                    return f"{v:.1f}{prefix}"
                v /= 1000
            return f"{v:.1f}P"
        return f"{v:g}"

    def _line(self) -> None:
        el = time.monotonic() - self._start
        unit = "" if self.unit == "B" else f" {self.unit}s" if self.n != 1 else f" {self.unit}"
        tot = f"/{self._fmt(self.total)}" if self.total else ""
        pct = f"  {100 * self.n / self.total:5.1f}%" if self.total else ""
        rate = self.n / el if el > 0 else 0.0
        rate_s = (f"{format_bytes(rate)}/s" if self.unit == "B"
                  else f"{rate:,.0f} {self.unit}s/s" if rate >= 100
                  else f"{rate:.3g} {self.unit}s/s")
        eta = (f"  ETA {format_duration((self.total - self.n) / rate)}"
               if self.total and rate > 0 and self.n < self.total else "")
        post = f"  {self.postfix}" if self.postfix else ""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} [{self.desc}] {self._fmt(self.n)}{tot}{unit}{pct}  "
              f"{format_duration(el)}  {rate_s}{eta}{post}", file=sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        self._line()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: float | None, desc: str, unit: str = "it", *, unit_scale: bool = False,
             enabled: bool = True) -> Any:
    """Return a progress object with ``update``/``close``/``set_postfix_str``."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                    dynamic_ncols=True, file=sys.stderr)
    return PlainProgress(total, desc, unit, unit_scale=unit_scale)
