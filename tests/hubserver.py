"""A small local server speaking the parts of the Hugging Face Hub protocol ingest uses.

It serves dataset repos from local folders, with several commits per repo, and can inject
faults. The routes are the ones ``huggingface_hub`` (2.4) calls for ``repo_info``,
``list_repo_tree`` and ``hf_hub_download``::

    GET  /api/datasets/{ns}/{name}[/revision/{rev}]     {"id", "sha", "siblings", ...}
    GET  /api/datasets/{ns}/{name}/tree/{rev}[/{path}]  [{"type","path","size","oid","lfs"}]
         ?recursive=..&cursor=N                          paged with Link: <..>; rel="next"
    HEAD /datasets/{ns}/{name}/resolve/{rev}/{path}     X-Repo-Commit, ETag, Content-Length
    GET  /datasets/{ns}/{name}/resolve/{rev}/{path}     the bytes; Range: bytes=N- -> 206

Errors are 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` and
401 when a token is required and missing. Xet is never advertised, so clients use plain
HTTP. ``*.pt`` files are listed as LFS files (``lfs.oid`` = sha256, the ETag too).

Run ``python -m tests.hubserver DIR [DIR ...] [--repo local/sim]`` to serve by hand: each
DIR becomes one commit adding its files (paths relative to DIR) to the previous one, and
``main`` points at the last. It prints the endpoint URL to use as ``HF_ENDPOINT``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass
class Blob:
    path: Path  #: local file holding the bytes
    size: int
    sha256: str
    git_oid: str  #: git blob sha1, the Hub's ``oid`` of a file

    @classmethod
    def of(cls, path: Path) -> Blob:
        data = path.read_bytes()
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return cls(path, len(data), hashlib.sha256(data).hexdigest(), git)

    @property
    def lfs(self) -> bool:
        return self.path.suffix == ".pt"


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  #: sha -> path -> blob
    refs: dict[str, str] = field(default_factory=dict)  #: branch -> sha

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


@dataclass
class Fault:
    """What to do to the ``nth`` request (1-based, HEAD and GET counted) of a repo path.

    ``status``: answer with this HTTP status (404 as ``EntryNotFound``); ``cut``: send
    half the body, then close the connection; ``corrupt``: flip one byte of the body.
    ``times`` requests in a row from the ``nth`` on are affected (0: all of them), only
    those of ``method`` when it is set.
    """

    kind: str
    nth: int = 1
    times: int = 1
    status: int = 500
    method: str | None = None

    def applies(self, count: int, method: str) -> bool:
        return (count >= self.nth and (self.times == 0 or count < self.nth + self.times)
                and self.method in (None, method))


class HubServer:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, page_size: int = 1000) -> None:
        self.repos: dict[str, Repo] = {}
        self.page_size = page_size
        self.token: str | None = None  #: when set, every request needs "Bearer <token>"
        self.faults: dict[str, list[Fault]] = {}
        self.counts: dict[str, int] = {}
        self.log: list[dict] = []  #: one dict per request: method, path, range, auth
        self.on_send: list = []  #: callables run before each body chunk is sent
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ repo content
    def add_commit(self, repo_id: str, root: str | Path, branch: str = "main") -> str:
        """Add every file under ``root`` on top of ``branch``'s head; return the new sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        files = dict(repo.commits.get(repo.refs.get(branch, ""), {}))
        root = Path(root)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                files[p.relative_to(root).as_posix()] = Blob.of(p)
        h = hashlib.sha1(repo.refs.get(branch, "").encode())
        for name, b in sorted(files.items()):
            h.update(f"{name}\0{b.sha256}\n".encode())
        sha = h.hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def fault(self, path: str, kind: str, **kw) -> None:
        self.faults.setdefault(path, []).append(Fault(kind, **kw))

    def requests(self, method: str | None = None, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.log if (method is None or r["method"] == method)
                    and (path is None or r["path"] == path)]

    # ------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args) -> None:
        pass

    # ---------------------------------------------------------------------- answers
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, headers: dict | None = None) -> None:
        self._reply(200, json.dumps(obj).encode(),
                    {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str,
               headers: dict | None = None) -> None:
        h = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._reply(status, json.dumps({"error": message}).encode(), h)

    # ---------------------------------------------------------------------- routing
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        auth = self.headers.get("Authorization")
        with hub.lock:
            hub.log.append({"method": self.command, "path": url.path,
                            "range": self.headers.get("Range"), "auth": auth})
        if hub.token is not None and auth != f"Bearer {hub.token}":
            return self._error(401, None, "Invalid username or password.")
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            return self._api(f"{parts[2]}/{parts[3]}", parts[4:], parse_qs(url.query))
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            return self._resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]))
        return self._error(404, None, "Not Found")

    def _repo_rev(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo, sha

    def _api(self, repo_id: str, rest: list[str], query: dict) -> None:
        if not rest or rest[0] == "revision":
            found = self._repo_rev(repo_id, rest[1] if len(rest) > 1 else "main")
            if found:
                repo, sha = found
                self._json({"id": repo_id, "sha": sha, "private": False, "gated": False,
                            "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})
            return None
        if rest[0] == "tree" and len(rest) >= 2:
            found = self._repo_rev(repo_id, rest[1])
            if found:
                self._tree(repo_id, rest[1], found[0].commits[found[1]], "/".join(rest[2:]),
                           query)
            return None
        return self._error(404, None, "Not Found")

    def _tree(self, repo_id: str, rev: str, files: dict[str, Blob], prefix: str,
              query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = prefix + "/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, b in files.items():
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            depth = len(rel) if recursive else 1
            for d in range(1, min(depth, len(rel) - 1) + 1):  # folders along the way
                folder = base + "/".join(rel[:d])
                entries[folder] = {"type": "directory", "path": folder,
                                   "oid": hashlib.sha1(folder.encode()).hexdigest()}
            if len(rel) == 1 or recursive:
                e = {"type": "file", "path": path, "size": b.size, "oid": b.git_oid}
                if b.lfs:
                    e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": 134}
                entries[path] = e
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist")
        ordered = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = ordered[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(ordered):
            path = f"/api/datasets/{repo_id}/tree/{quote(rev, safe='')}"
            if prefix:
                path += "/" + quote(prefix, safe="")
            nxt = (f"{self.hub.url}{path}?recursive={str(recursive).lower()}"
                   f"&cursor={start + self.hub.page_size}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self._json(page, headers)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        hub = self.hub
        found = self._repo_rev(repo_id, rev)
        if not found:
            return None
        repo, sha = found
        blob = repo.commits[sha].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist",
                               {"X-Repo-Commit": sha})
        with hub.lock:
            hub.counts[path] = n = hub.counts.get(path, 0) + 1
        faults = [f for f in hub.faults.get(path, []) if f.applies(n, self.command)]
        for f in faults:
            if f.kind == "status":
                return self._error(f.status, "EntryNotFound" if f.status == 404 else None,
                                   f"injected {f.status}", {"X-Repo-Commit": sha})
        data = blob.path.read_bytes()
        if any(f.kind == "corrupt" for f in faults):
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            start = int(rng.removeprefix("bytes=").split("-")[0])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.git_oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Length": str(len(data) - start)}
        self.send_response(206 if start else 200)
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return None
        body = memoryview(data)[start:]
        stop = len(body) // 2 if any(f.kind == "cut" for f in faults) else len(body)
        step = 1 << 20
        for i in range(0, stop, step):
            for cb in hub.on_send:
                cb()
            self.wfile.write(body[i:min(i + step, stop)])
        if stop < len(body):
            self.wfile.flush()
            self.close_connection = True
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.hubserver", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="one folder per commit, oldest first")
    p.add_argument("--repo", default="local/sim", help="dataset repo id (default local/sim)")
    a = p.parse_args(argv)
    hub = HubServer()
    shas = [hub.add_commit(a.repo, d) for d in a.dirs]
    with hub:
        for d, sha in zip(a.dirs, shas, strict=True):
            print(f"commit {sha}  {d}", flush=True)
        print(f"serving hf://datasets/{a.repo} at {hub.url}  (Ctrl-C stops)", flush=True)
        print(f"HF_ENDPOINT={hub.url} kernelscale ingest hf://datasets/{a.repo} --store STORE",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
