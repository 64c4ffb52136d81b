"""A kernel published on the Hub, ``hf://datasets/OWNER/NAME[@REVISION][/PATH]``, made a
local folder: downloaded into the Hub cache and verified before anyone reads it.

The revision is pinned to a commit first; the kernel's own members (``zarr.json``, the
``kernel`` or ``values``/``indices`` arrays, the ``.done`` tile markers) are fetched by
``huggingface_hub.snapshot_download`` into its cache (``cache_dir``, default the library's
``HF_HUB_CACHE``), so a second open reads no byte again; then every chunk of every
finished tile is checked as ``kernelscale verify`` checks it (size and CRC-32C). The
token is the library's and is never printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import KernelOutputError
from .sources.hub import HubError
from .sources.hubfail import explain
from .sources.hubspec import is_hub_spec, parse_hub_spec

#: what a kernel folder holds that a reader needs (see :mod:`kernelscale.output`)
KERNEL_PARTS = ("zarr.json", "kernel/*", "values/*", "indices/*", ".done/*")
_SHA = re.compile(r"[0-9a-f]{40}")


@contextlib.contextmanager
def hub_progress(show: bool):
    """``huggingface_hub``'s progress bars on (``show``) or off, and the deprecation
    warnings of its HTTP stack (not this program's to act on) silenced, for one call."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_off = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if not show and not was_off:
            enable_progress_bars()


def is_hub_kernel(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and is_hub_spec(path)


def local_kernel(path: str | os.PathLike, *, quiet: bool = False) -> str | os.PathLike:
    """The local folder of a kernel path: an ``hf://`` kernel fetched and verified
    (:func:`fetch_kernel`, into the Hub cache), any other path as it is."""
    return fetch_kernel(path, quiet=quiet) if is_hub_kernel(path) else path


def fetch_kernel(spec: str, *, cache_dir: str | os.PathLike | None = None,
                 endpoint: str | None = None, token: str | bool | None = None,
                 quiet: bool = False) -> Path:
    """The local folder of the kernel ``spec`` names, downloaded (or found in the cache)
    at the revision's commit and verified; :class:`KernelOutputError` names the first
    damaged chunk, :class:`HubError` a failed request."""
    from huggingface_hub import HfApi, snapshot_download

    s = parse_hub_spec(spec)
    api = HfApi(endpoint=endpoint, token=token)
    revision = s.revision or "main"
    try:
        commit = (revision if _SHA.fullmatch(revision) else
                  str(api.repo_info(s.repo_id, repo_type="dataset", revision=revision).sha))
        base = f"{s.prefix}/" if s.prefix else ""
        with hub_progress(not quiet):
            root = snapshot_download(s.repo_id, repo_type="dataset", revision=commit,
                                     allow_patterns=[base + p for p in KERNEL_PARTS],
                                     cache_dir=cache_dir, endpoint=endpoint, token=token)
    except Exception as e:
        if not _is_hub_failure(e):
            raise
        raise HubError(f"{spec}: {explain(e, None)}") from None
    local = Path(root) / s.prefix
    _verify(spec, local)
    if not quiet:
        print(f"hub: {spec} = commit {commit}: kernel verified in {local}", file=sys.stderr)
    return local


def _is_hub_failure(e: Exception) -> bool:
    from .sources.hubfail import http_status, is_transient

    names = {c.__name__ for c in type(e).__mro__}
    return (http_status(e)[0] is not None or is_transient(e) or isinstance(e, OSError)
            or bool(names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError",
                             "EntryNotFoundError"}))


def _verify(spec: str, local: Path) -> None:
    from .integrity import verify_kernel
    from .kernelread import load_kernel

    if not (local / "zarr.json").is_file():
        raise KernelOutputError(f"{spec}: no kernel there (no zarr.json at "
                                f"{local.name or 'the repo root'})")
    rep = verify_kernel(local)
    if rep.problems:
        raise KernelOutputError(f"{spec}: the downloaded kernel fails verification: "
                                f"{rep.problems[0].path.relative_to(local)}: "
                                f"{rep.problems[0].problem} ({len(rep.problems)} problem(s); "
                                f"the damaged copy is in the Hub cache at {local}: delete "
                                "it there to download it again)")
    load_kernel(local)  # complete, every finished chunk present at its size
