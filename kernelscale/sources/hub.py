"""Hugging Face Hub source: ``hf://datasets/OWNER/NAME[@REVISION][/PATH/PREFIX]``.

The revision (default ``main``) is pinned to a commit sha once, at the start; the tree
under ``PATH/PREFIX`` is listed at that commit and every file is downloaded at that
commit, so a run never mixes two states of the repo. Talking to the Hub is left entirely
to ``huggingface_hub``: the endpoint comes from its ``HF_ENDPOINT`` setting (or the
``endpoint`` argument), the token from its usual places (``HF_TOKEN``, the token file).
A token is never printed, logged or recorded.

Files are downloaded by ``download_workers`` threads into the library's cache
(``cache_dir``) and handed to the consumer (the single writer of the ingest) in sorted
path order. At most ``download_workers`` downloaded files wait for their commit at any
time and each is deleted once its runs are in the store (unless ``keep_downloads``), so
local disk for downloads stays below ``(download_workers + 1) x`` the largest file. A file whose bytes
do not match the listing's LFS sha256 is rejected and its blob removed from the cache.

A file can also be read in part without downloading it (:meth:`HubSource.open_lazy`:
HTTP ranged requests at the pinned commit, through the library's session and headers),
which is how ``kernelscale ls`` and ``ingest --dry-run`` read a file's header in any
format; listing (:meth:`HubSource.tree`) and ranged reads touch no file.

The manifest name of a file is its path inside the repo, so re-running against a newer
revision ingests only the files that are new; each file entry records the ``commit`` it
was downloaded at, its ``hub_path`` and ``lfs_sha256``, and the manifest's ``sources``
list records every (repo, revision asked, commit) that contributed files.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.hf_api import RepoFile

from ..errors import ConfigError, KernelscaleError
from ..logfile import sha256_file
from ..units import format_bytes
from .base import Fetched, FetchOptions, Source, SourceFile
from .hubfail import explain, is_transient, safe_endpoint
from .hubspec import HubSpec, glob_regex, inside, is_hub_spec, literal_dir, parse_hub_spec
from .ranged import RangedFile, http_range

DEFAULT_REVISION = "main"
#: longest wait between two attempts of one request, seconds
MAX_RETRY_WAIT = 60.0
#: seconds to wait for the Hub's answer to the revision lookup
API_TIMEOUT = 60.0



#: a per-process partial download of huggingface_hub 2.x: ``<etag>.<8 hex>.incomplete``
_UNIQUE_PARTIAL = re.compile(r"\.[0-9a-f]{8}\.incomplete$")
#: a partial download not written for this long belongs to a dead process
STALE_PARTIAL_SECONDS = 600.0


class HubError(KernelscaleError):
    """The Hub refused a request, or it kept failing after the allowed retries."""


class _Cancelled(Exception):
    """Raised inside a download thread to stop a transfer nobody will use."""


# ------------------------------------------------------------------------- client

@dataclass(frozen=True)
class HubFile:
    """One file of the listing: path in the repo, size in bytes, LFS sha256 if any."""

    path: str
    size: int
    sha256: str | None


@dataclass
class _Download(Fetched):
    """``path``: the snapshot path hf_hub_download returned; ``blob``: the file holding
    the bytes (the path itself when not a symlink)."""

    blob: Path | None = None
    #: the cache held the file before this run: it is another tool's, never deleted
    preexisting: bool = False
    #: the mark that this tool began the download (removed with the file)
    claim: Path | None = None


class HubSource(Source):
    """The files of one Hub spec at one pinned commit, and their downloads."""

    kind = "hub"

    def __init__(self, spec: HubSpec | str, options: FetchOptions | None = None, *,
                 endpoint: str | None = None, token: str | bool | None = None,
                 retry_wait: float = 1.0) -> None:
        o = options or FetchOptions()
        revision, cache_dir, workers = o.revision, o.cache_dir, o.download_workers
        retries, keep_downloads = o.retries, o.keep_downloads
        self.spec = parse_hub_spec(spec) if isinstance(spec, str) else spec
        if revision and self.spec.revision and revision != self.spec.revision:
            raise ConfigError(f"{self.spec}: --revision {revision} contradicts the "
                              f"revision in the source")
        if workers < 1:
            raise ConfigError(f"--download-workers must be >= 1, not {workers}")
        if retries < 0:
            raise ConfigError(f"--retries must be >= 0, not {retries}")
        self.revision = revision or self.spec.revision or DEFAULT_REVISION
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
        self.workers = workers
        self.retries = retries
        self.retry_wait = retry_wait
        self.keep_downloads = keep_downloads
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.commit: str | None = None
        self.files: dict[str, HubFile] = {}
        self.bytes_downloaded = 0
        self._lock = threading.Lock()
        self._blobs: Counter[Path] = Counter()  # downloads not yet released, per blob
        self._cancel = threading.Event()
        self._bar_kw = ({"tqdm_class": _silent_bar(self._cancel, self._count)}
                        if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {})

    # ---------------------------------------------------------------- retry wrapper
    def _attempts(self, label: str, fn):
        """Call ``fn()``; retry transient failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return fn()
            except (_Cancelled, KernelscaleError):
                raise
            except Exception as e:
                if not is_transient(e):
                    raise HubError(f"{label}: {explain(e, self.commit)}") from None
                if attempt == self.retries:
                    raise HubError(f"{label}: {explain(e, self.commit)}; gave up after "
                                   f"{attempt + 1} attempt(s) (--retries {self.retries})"
                                   ) from None
                wait = min(MAX_RETRY_WAIT, self.retry_wait * 2 ** attempt)
                attempt += 1
                self._note(f"{label}: {explain(e, self.commit)}; retry {attempt}/"
                           f"{self.retries} in {wait:.1f} s")
                if self._cancel.wait(wait):
                    raise _Cancelled() from None

    def _count(self, n: float) -> None:
        with self._lock:
            self.bytes_downloaded += int(n)

    def _note(self, msg: str) -> None:
        print(f"hub: {msg}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return str(self.spec)

    @classmethod
    def can_open(cls, spec: str) -> bool:
        return is_hub_spec(spec)

    # ---------------------------------------------------------------- pin, list
    def pin(self) -> str:
        """Pin the revision to a commit sha (once): every listing and download uses it."""
        if self.commit is None:
            info = self._attempts(str(self.spec), lambda: self.api.repo_info(
                self.spec.repo_id, repo_type="dataset", revision=self.revision,
                timeout=API_TIMEOUT))
            if not info.sha:
                raise HubError(f"{self.spec}: the Hub did not name the commit of revision "
                               f"{self.revision!r}")
            self.commit = str(info.sha)
        return self.commit

    def sweep_stale_partials(self, max_age: float = STALE_PARTIAL_SECONDS) -> int:
        """Delete this repo's abandoned per-process partial downloads; return bytes freed.

        huggingface_hub 2.x downloads into ``<blob>.<8 hex>.incomplete``, a name unique to
        the process and never resumed by another: a killed ingest leaves one behind, up to
        a whole file. Only such names untouched for ``max_age`` seconds are removed (a live
        download writes continuously); ``<blob>.incomplete`` of older versions, which a
        later call resumes from, is kept.
        """
        from huggingface_hub.file_download import repo_folder_name

        blobs = self.cache_dir / repo_folder_name(repo_id=self.spec.repo_id,
                                                  repo_type="dataset") / "blobs"
        freed = 0
        now = time.time()
        for p in blobs.glob("*.incomplete") if blobs.is_dir() else ():
            if not _UNIQUE_PARTIAL.search(p.name):
                continue
            try:
                st = p.stat()
                if now - st.st_mtime >= max_age:
                    p.unlink()
                    freed += st.st_size
            except FileNotFoundError:
                continue
        if freed:
            self._note(f"removed {format_bytes(freed)} of abandoned partial downloads")
        return freed

    def tree(self, glob: str = "**/log.pt") -> list[HubFile]:
        """Files under the prefix matching ``glob`` at the pinned commit, sorted by path
        (none: an empty list). Only asks the Hub; touches no file.

        ``glob`` is matched against the path inside the repo, or against the path
        relative to the spec's prefix.
        """
        commit = self.pin()
        prefix = self.spec.prefix
        rx = glob_regex(glob)
        # A glob naming folders literally (one file of 20,000) lists only those folders.
        lit = literal_dir(glob)
        root = lit if lit and inside(lit, prefix) else prefix

        def fetch() -> list[HubFile]:
            out = []
            for e in self.api.list_repo_tree(self.spec.repo_id, path_in_repo=root or None,
                                             recursive=True, revision=commit,
                                             repo_type="dataset"):
                if not isinstance(e, RepoFile) or not inside(e.path, prefix):
                    continue
                rel = e.path[len(prefix) + 1:] if prefix else e.path
                if rx.match(e.path) or rx.match(rel):
                    out.append(HubFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None))
            return out

        try:
            files = self._attempts(str(self.spec), fetch)
        except HubError as e:
            if root != prefix and "HTTP 404" in str(e):
                files = []  # the folder the glob names does not exist at this commit
            else:
                raise
        files.sort(key=lambda f: f.path)
        self.files.update({f.path: f for f in files})
        return files

    def list(self, glob: str = "**/log.pt") -> list[SourceFile]:
        """:meth:`tree`, as the files of an ingest; none is an error. The manifest name
        of a file is its path in the repo."""
        files = self.tree(glob)
        if not files:
            raise HubError(f"{self.spec}: no files match {glob!r} at commit {self.commit}")
        self._note(f"{self.spec} revision {self.revision} = commit {self.commit}: "
                   f"{len(files)} file(s) match {glob!r}; {self.workers} download worker(s), "
                   f"cache {self.cache_dir}")
        return [SourceFile(f.path, f.size, f.sha256) for f in files]

    def read_range(self, path: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of ``path`` at the pinned commit, by one ranged request
        (retried like any other); :class:`~.ranged.RangesUnsupported` when the server
        answers with the whole file instead (nothing of it is read)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.spec.repo_id, path, repo_type="dataset", revision=self.pin(),
                         endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        return self._attempts(self.spec.label(path), lambda: http_range(
            url, start, stop, headers, API_TIMEOUT))

    def label(self, name: str) -> str:
        return self.spec.label(name)

    def open_lazy(self, file: SourceFile) -> RangedFile:
        """``file`` as a seekable binary file read by ranged requests."""
        return RangedFile(file.size, lambda a, b: self.read_range(file.name, a, b),
                          name=self.spec.label(file.name))

    # ------------------------------------------------------------------- download
    def download(self, f: HubFile) -> _Download:
        """Download one file at the resolved commit (retrying); return where it lies."""
        commit = self.pin()
        repo_dir = self.cache_dir / f"datasets--{self.spec.repo_id.replace('/', '--')}"
        # A file the cache holds is another tool's unless a claim of ours says we began
        # downloading it (a claim outlives a killed run, so its file is still ours).
        claim = self._claim_path(commit, f)
        held = ((repo_dir / "snapshots" / commit / f.path).exists()
                or (f.sha256 is not None and (repo_dir / "blobs" / f.sha256).exists()))
        preexisting = held and not claim.exists()
        if not preexisting:
            claim.parent.mkdir(parents=True, exist_ok=True)
            claim.touch()
        # Same cache_dir on every attempt and run: the library resumes partial downloads
        # there (within the call in 2.x; from `<blob>.incomplete` on the next call before).
        try:
            p = self._attempts(self.spec.label(f.path), lambda: hf_hub_download(
                self.spec.repo_id, f.path, repo_type="dataset", revision=commit,
                cache_dir=self.cache_dir, endpoint=self.endpoint, token=self.token,
                **self._bar_kw))
        except BaseException:
            # nothing of ours arrived: a later download by another tool is not ours
            if not preexisting and not (repo_dir / "snapshots" / commit / f.path).exists():
                claim.unlink(missing_ok=True)
            raise
        path = Path(p)
        blob = Path(os.path.realpath(path))
        with self._lock:
            self._blobs[blob] += 1
        return _Download(SourceFile(f.path, f.size, f.sha256), path, blob=blob,
                         preexisting=preexisting, claim=None if preexisting else claim)

    def _claim_path(self, commit: str, f: HubFile) -> Path:
        """Where this tool marks a download it began (``CACHE/.kernelscale-claims``)."""
        key = f.sha256 or hashlib.sha256(f"{self.spec.repo_id}@{commit}/{f.path}".encode()
                                         ).hexdigest()
        return self.cache_dir / ".kernelscale-claims" / key

    def release(self, d: Fetched, bad: bool = False) -> None:
        """Forget a download; delete its file unless kept. A rejected file whose bytes do
        not match the listing's sha256 goes too (the cache would serve it again), unless
        the cache held it before this run: then it is another tool's and stays."""
        if d.released or not isinstance(d, _Download):
            return
        corrupt = (bad and d.file.sha256 is not None and d.blob.exists()
                   and sha256_file(d.blob) != d.file.sha256)
        d.released = True
        with self._lock:
            self._blobs[d.blob] -= 1
            in_use = self._blobs[d.blob] > 0
            if not in_use:
                del self._blobs[d.blob]
        if in_use or d.preexisting or (self.keep_downloads and not corrupt):
            return  # a file this run did not download is not this run's to delete
        for p in (d.path, d.blob, d.claim):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        # Drop the snapshot folders left empty, up to the commit's snapshot folder.
        parent, stop = d.path.parent, self.cache_dir
        while parent != stop and stop in parent.parents and parent.name != self.commit:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # ------------------------------------------------------------------- pipeline
    def fetch(self, files: Iterable[SourceFile]) -> Iterator[Fetched]:
        """Download ``files`` ahead with the workers; yield each, in order.

        The next download starts when the consumer asks for the next file, so a
        consumer holding at most ``h`` files it has not released (the ingest: its
        converters' window and the file being committed) keeps the download folder
        within ``(download_workers + h) x`` the largest file. When the consumer closes
        the iteration early, the files fetched and not released are released (deleted
        unless kept); after the last file, or a download that failed, they stay the
        consumer's to release. Abandoned partial downloads of earlier runs are swept
        first.
        """
        self.sweep_stale_partials()
        pending: deque[Future] = deque()
        todo = iter(files)
        handed: list[_Download] = []
        stopped_early = False
        self._cancel.clear()
        self._t0 = time.monotonic()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hub-download")
        try:
            while True:
                while len(pending) < self.workers and (f := next(todo, None)) is not None:
                    pending.append(pool.submit(self.download, self.files[f.name]))
                if not pending:
                    return
                d = pending.popleft().result()
                handed = [h for h in handed if not h.released] + [d]
                yield d
        except GeneratorExit:
            stopped_early = True
            raise
        finally:
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for d in handed if stopped_early else ():
                self.release(d)
            for fut in pending:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self.release(fut.result())

    def close(self) -> None:
        self._cancel.set()
        if self.bytes_downloaded:
            dt = time.monotonic() - getattr(self, "_t0", time.monotonic())
            self._note(f"downloaded {format_bytes(self.bytes_downloaded)} in {dt:.1f} s")

    def entry(self, file: SourceFile) -> dict:
        hf = self.files[file.name]
        extra = {"commit": self.commit, "hub_path": hf.path}
        if hf.sha256:
            extra["lfs_sha256"] = hf.sha256
        return extra

    def record(self, glob: str) -> dict:
        return {"kind": self.kind, "repo": f"datasets/{self.spec.repo_id}",
                "revision": self.revision, "commit": self.commit,
                "path": self.spec.prefix, "glob": glob,
                "endpoint": safe_endpoint(self.endpoint)}


def _silent_bar(cancel: threading.Event, count) -> type:
    """A tqdm stand-in for hf_hub_download: counts bytes, stops a cancelled transfer."""

    class _Bar:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: float = 1) -> None:
            if cancel.is_set():
                raise _Cancelled()
            count(n)

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc) -> bool:
            return False

        def __getattr__(self, name: str):
            return lambda *a, **k: None

    return _Bar
