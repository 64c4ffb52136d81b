"""Where ``log.pt`` files come from: one :class:`Source` interface, chosen in one place.

A source lists its files (sorted by the name the manifest records) and fetches them to
local paths, in that order, a few ahead of the consumer; the consumer hands each back
with :meth:`Source.release` once it is done with it (committed or rejected). Each
implementation says which specs it opens (:meth:`Source.can_open`) and
:func:`open_source` asks them in turn, so no other module tells a Hub spec from a folder.

* :class:`~kernelscale.sources.local.LocalSource`: a directory (any path without a scheme)
* :class:`~kernelscale.sources.hub.HubSource`: ``hf://datasets/OWNER/NAME[@REV][/PATH]``
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .base import Fetched, FetchOptions, Source, SourceFile, is_local_spec

__all__ = ["FetchOptions", "Fetched", "Source", "SourceFile", "is_local_spec", "open_source"]


def open_source(spec: str | os.PathLike, options: FetchOptions | None = None, *,
                endpoint: str | None = None, token: str | bool | None = None,
                retry_wait: float = 1.0) -> Source:
    """The source ``spec`` names; ``endpoint``/``token``/``retry_wait`` reach the Hub client."""
    # imported here: the Hub client is a heavy import that only remote sources need
    from .hub import HubSource
    from .local import LocalSource

    options = options or FetchOptions()
    text = os.fspath(spec)
    if HubSource.can_open(text):
        return HubSource(text, options, endpoint=endpoint, token=token,
                         retry_wait=retry_wait)
    if LocalSource.can_open(text):
        return LocalSource(text)
    raise ConfigError(f"{text}: not a source kernelscale can read (a directory, or "
                      "hf://datasets/OWNER/NAME[@REVISION][/PATH])")
