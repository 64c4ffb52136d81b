"""A remote file read by byte ranges, as a seekable read-only binary file.

:class:`RangedFile` serves ``read``/``seek`` from ranges it fetched with
``fetch(start, stop)`` (e.g. an HTTP ``Range`` request): each fetch is at least ``block``
bytes, a first read that ends in the last ``tail`` bytes fetches all of them at once
(where a zip keeps its directory; all of a small file), and ``limit`` bounds the bytes
fetched in all. Reading a ``log.pt``'s zip directory and pickle header through it
(:mod:`kernelscale.formats.torchzip`) costs two requests: the tail, and the pickle's
bytes, which the directory locates; a safetensors or ``.npy`` header, one request at the
start.
"""

from __future__ import annotations

import io
from collections.abc import Callable

#: bytes fetched from the end of the file on the first read (a zip's directory)
TAIL_BYTES = 16 << 10
#: the smallest fetch
BLOCK_BYTES = 8 << 10


class RangedFile(io.RawIOBase):
    """``size`` bytes whose ranges ``[start, stop)`` come from ``fetch(start, stop)``."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], *,
                 block: int = BLOCK_BYTES, tail: int = TAIL_BYTES, name: str = "",
                 limit: int | None = None) -> None:
        super().__init__()
        self.size = int(size)
        self._fetch = fetch
        self.block = block
        self.tail = tail
        self.name = name
        #: the most bytes fetched in all (None: no limit); a read past it raises OSError
        self.limit = limit
        self.pos = 0
        self.requests = 0
        self.bytes_fetched = 0
        self._ranges: list[tuple[int, bytes]] = []  # (start, bytes), fetched so far

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.name}: negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def prefetch(self, start: int, stop: int) -> None:
        """Fetch bytes ``[start, stop)`` (clipped to the file) by one request now, unless
        held: a caller that knows where its next reads lie saves requests."""
        start, stop = max(0, start), min(self.size, stop)
        if start < stop:
            self._get(start, stop, exact=True)

    def _get(self, start: int, stop: int, exact: bool = False) -> bytes:
        for s, data in self._ranges:
            if s <= start and stop <= s + len(data):
                return data[start - s:stop - s]
        if not self._ranges and self.tail and stop > self.size - self.tail and not exact:
            lo = max(0, min(start, self.size - self.tail))
            hi = self.size
        else:
            lo, hi = start, min(self.size, max(stop, start + (0 if exact else self.block)))
            # not again what is held after the range asked
            hi = min([hi] + [s for s, _ in self._ranges if stop <= s < hi])
        if self.limit is not None and self.bytes_fetched + hi - lo > self.limit:
            raise OSError(f"{self.name}: reading its header would fetch more than "
                          f"{self.limit} bytes; refused")
        data = self._fetch(lo, hi)
        if len(data) != hi - lo:
            raise OSError(f"{self.name}: asked bytes {lo}-{hi - 1}, got {len(data)} bytes")
        self.requests += 1
        self.bytes_fetched += len(data)
        self._ranges.append((lo, data))
        return data[start - lo:stop - lo]

    def readinto(self, buf) -> int:
        n = min(len(buf), max(0, self.size - self.pos))
        if n == 0:
            return 0
        data = self._get(self.pos, self.pos + n)
        buf[:n] = data
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, max(0, self.size - self.pos))
        if n == 0:
            return b""
        data = self._get(self.pos, self.pos + n)
        self.pos += n
        return data


class RangesUnsupported(OSError):
    """The server answered a ranged request with the whole file."""


def http_range(url: str, start: int, stop: int, headers: dict[str, str],
               timeout: float) -> bytes:
    """Bytes ``[start, stop)`` of ``url`` by one ``Range`` request through the Hub
    client's session (redirects followed, ``headers`` sent: they may hold the token,
    which is never shown). An HTTP error is raised as the Hub client raises it; a ``200``
    answer (the server ignores ranges) raises :class:`RangesUnsupported` before its body
    is read, and a body longer than asked is cut off."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    want = stop - start
    with get_session().stream("GET", url, headers={**headers,
                                                   "Range": f"bytes={start}-{stop - 1}"},
                              timeout=timeout, follow_redirects=True) as r:
        if r.status_code == 200 and not (start == 0 and _length(r) == want):
            raise RangesUnsupported(f"{url.rsplit('/', 1)[-1]}: the server does not "
                                    "answer ranged requests")
        if r.status_code >= 300:
            r.read()
            hf_raise_for_status(r)
        out = bytearray()
        for chunk in r.iter_bytes():
            out += chunk
            if len(out) >= want:
                break
    return bytes(out[:want])


def _length(r) -> int | None:
    try:
        return int(r.headers.get("Content-Length", ""))
    except ValueError:
        return None
