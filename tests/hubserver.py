"""A small local server speaking the parts of the Hugging Face Hub protocol ingest uses.

It serves dataset repos from local folders, with several commits per repo, and can inject
faults. The routes are the ones ``huggingface_hub`` (2.4) calls for ``repo_info``,
``list_repo_tree`` and ``hf_hub_download``::

    GET  /api/datasets/{ns}/{name}[/revision/{rev}]     {"id", "sha", "siblings", ...}
    GET  /api/datasets/{ns}/{name}/tree/{rev}[/{path}]  [{"type","path","size","oid","lfs"}]
         ?recursive=..&cursor=N                          paged with Link: <..>; rel="next"
    HEAD /datasets/{ns}/{name}/resolve/{rev}/{path}     X-Repo-Commit, ETag, Content-Length
    GET  /datasets/{ns}/{name}/resolve/{rev}/{path}     the bytes; Range: bytes=A-[B] or
                                                         bytes=-N -> 206

Errors are 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` and
401 when a token is required and missing. Xet is never advertised, so clients use plain
HTTP. ``*.pt`` files are listed as LFS files (``lfs.oid`` = sha256, the ETag too).

Writes (``kernelscale publish``) go through the routes ``huggingface_hub`` (2.4) calls for
``create_repo``, ``create_branch`` and ``create_commit`` with plain-HTTP LFS (Xet off)::

    POST /api/repos/create                               {"name","organization","type",
                                                          "visibility"} -> {"url"}; 409 exists
    POST /api/validate-yaml                              README.md front matter -> 200 / 400
    POST /api/datasets/{ns}/{name}/preupload/{rev}       {"files":[{"path","uploadMode",
                                                          "shouldIgnore","oid"}]}
    POST /datasets/{ns}/{name}.git/info/lfs/objects/batch  upload/verify actions per object
                                                          (none when the server holds it)
    PUT  /lfs-upload/{sha256}                            the bytes (unauthenticated, like a
                                                          presigned URL); sha256 checked
    POST /lfs-verify/{sha256}                            200 when held, else 404
    POST /api/datasets/{ns}/{name}/commit/{rev}          ndjson header/file/lfsFile/deleted*
                                                          -> {"commitOid","commitUrl"};
                                                          412 when parentCommit is not the head
    POST /api/datasets/{ns}/{name}/branch/{branch}       {"startingPoint"}; 409 exists

Every write but the LFS PUT needs ``Authorization: Bearer T``: none is 401, a token in
:attr:`HubServer.read_only_tokens` is 403. Uploaded bytes live in a temporary folder of the
server (removed by :meth:`HubServer.stop`); :meth:`HubServer.files` reads a served revision
back. A file is stored as LFS when it is binary (not UTF-8, or holds NUL) or at least
``lfs_threshold`` bytes, as the Hub decides.

Run ``python -m tests.hubserver DIR [DIR ...] [--repo local/sim]`` to serve by hand: each
DIR becomes one commit adding its files (paths relative to DIR) to the previous one, and
``main`` points at the last. It prints the endpoint URL to use as ``HF_ENDPOINT``.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import dataclasses
import hashlib
import json
import tempfile
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
    #: stored as LFS (True) or as a regular git file (False); None: ``*.pt`` files are LFS
    stored_lfs: bool | None = None

    @classmethod
    def of(cls, path: Path) -> Blob:
        data = path.read_bytes()
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return cls(path, len(data), hashlib.sha256(data).hexdigest(), git)

    @property
    def lfs(self) -> bool:
        return self.stored_lfs if self.stored_lfs is not None else self.path.suffix == ".pt"


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  #: sha -> path -> blob
    refs: dict[str, str] = field(default_factory=dict)  #: branch -> sha
    private: bool = False
    messages: dict[str, str] = field(default_factory=dict)  #: sha -> commit summary

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)

    def commit(self, branch: str, files: dict[str, Blob], message: str = "") -> str:
        """Make ``files`` the new head of ``branch``; return the commit's sha."""
        h = hashlib.sha1(self.refs.get(branch, "").encode())
        for name, b in sorted(files.items()):
            h.update(f"{name}\0{b.sha256}\n".encode())
        sha = h.hexdigest()
        self.commits[sha] = files
        self.refs[branch] = sha
        self.messages[sha] = message
        return sha


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
        self.read_only_tokens: set[str] = set()  #: may read, get 403 on a write
        self.lfs_threshold = 10 << 20  #: text files this large are stored as LFS too
        self.lfs_objects: dict[str, Path] = {}  #: sha256 -> uploaded LFS bytes
        self._tmp: tempfile.TemporaryDirectory | None = None
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
        return repo.commit(branch, files, f"add {root}")

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``rev`` (branch or sha): path -> bytes."""
        repo = self.repos[repo_id]
        return {p: b.path.read_bytes() for p, b in repo.commits[repo.resolve(rev)].items()}

    def store_bytes(self, data: bytes, lfs: bool) -> Blob:
        """Keep ``data`` in the server's folder (by its sha256); its :class:`Blob`."""
        with self.lock:  # handler threads write at once
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="hubserver-")
            path = Path(self._tmp.name) / hashlib.sha256(data).hexdigest()
            if not path.exists():
                path.write_bytes(data)
        return dataclasses.replace(Blob.of(path), stored_lfs=lfs)

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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

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
                self._json({"id": repo_id, "sha": sha, "private": repo.private, "gated": False,
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
        start, end = 0, len(data)
        rng = self.headers.get("Range")
        if rng and self.command == "GET":  # bytes=A-, bytes=A-B, bytes=-N
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = ((max(0, len(data) - int(b)), len(data)) if not a else
                          (int(a), min(len(data), int(b) + 1) if b else len(data)))
        ranged = (start, end) != (0, len(data))
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.git_oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Length": str(end - start)}
        self.send_response(206 if ranged else 200)
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return None
        body = memoryview(data)[start:end]
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

    # ----------------------------------------------------------------------- writes
    def do_POST(self) -> None:
        self._write()

    def do_PUT(self) -> None:
        self._write()

    def _body(self) -> bytes:
        """The request body, sent with Content-Length or chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _may_write(self) -> bool:
        """A write needs a token that may write: none (or an unknown one) is 401, a
        read-only one 403."""
        hub = self.hub
        auth = self.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if token in hub.read_only_tokens:
            self._error(403, None, "You don't have the rights to write to this repository: "
                        "the token is read-only")
            return False
        if not token or (hub.token is not None and token != hub.token):
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _write(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        body = self._body()  # read before any answer: the connection is kept alive
        with hub.lock:
            hub.log.append({"method": self.command, "path": url.path, "range": None,
                            "auth": self.headers.get("Authorization")})
        if self.command == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            return self._lfs_put(parts[1], body)
        if self.command == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body or b"{}"))
        if self.command != "POST" or not self._may_write():
            return None if self.command == "POST" else self._error(405, None, "Not allowed")
        if parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if len(parts) == 2 and parts[0] == "lfs-verify":
            return (self._json({"oid": parts[1]}) if parts[1] in hub.lfs_objects else
                    self._error(404, None, "object not uploaded"))
        if (parts[:1] == ["datasets"] and len(parts) == 7 and parts[2].endswith(".git")
                and parts[3:] == ["info", "lfs", "objects", "batch"]):
            return self._lfs_batch(f"{parts[1]}/{parts[2][:-4]}", json.loads(body or b"{}"))
        if parts[:2] == ["api", "datasets"] and len(parts) == 6:
            repo_id, what, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if what == "preupload":
                return self._preupload(repo_id, rev, json.loads(body or b"{}"))
            if what == "commit":
                return self._commit(repo_id, rev, body)
            if what == "branch":
                return self._branch(repo_id, rev, json.loads(body or b"{}"))
        return self._error(404, None, "Not Found")

    def _validate_yaml(self, req: dict) -> None:
        import yaml

        text = str(req.get("content", ""))
        meta = None
        if text.startswith("---\n"):
            end = text.find("\n---", 4)
            try:
                meta = yaml.safe_load(text[4:end]) if end > 0 else "unclosed"
            except yaml.YAMLError as e:
                meta = str(e)
        if meta is not None and not isinstance(meta, dict):
            body = {"errors": [{"message": f"invalid YAML metadata: {meta}"}]}
            return self._reply(400, json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
        return self._json({"errors": [], "warnings": []})

    def _create_repo(self, req: dict) -> None:
        hub = self.hub
        if req.get("type") != "dataset":
            return self._error(400, None, "this server holds dataset repos only")
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        if repo_id in hub.repos:
            return self._reply(409, json.dumps({"error": "You already created this dataset "
                                                "repo", "url": f"{hub.url}/datasets/{repo_id}"}
                                               ).encode(), {"Content-Type": "application/json"})
        private = req.get("visibility") == "private" or bool(req.get("private"))
        repo = hub.repos[repo_id] = Repo(private=private)
        attrs = hub.store_bytes(b"*.bin filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
        repo.commit("main", {".gitattributes": attrs}, "initial commit")
        return self._json({"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})

    def _branch(self, repo_id: str, branch: str, req: dict) -> None:
        found = self._repo_rev(repo_id, req.get("startingPoint") or "main")
        if found:
            repo, sha = found
            if branch in repo.refs:
                return self._error(409, None, f"branch {branch} already exists")
            repo.refs[branch] = sha
            self._json({})
        return None

    def _mode(self, size: int, sample: bytes) -> str:
        """"lfs" for a binary file (its first bytes not UTF-8, or holding NUL) or a large
        one; else "regular". An empty file is always regular."""
        try:  # incremental: a character cut at the end of the sample is not an error
            codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
            binary = b"\0" in sample
        except UnicodeDecodeError:
            binary = True
        return "lfs" if size and (binary or size >= self.hub.lfs_threshold) else "regular"

    def _preupload(self, repo_id: str, rev: str, req: dict) -> None:
        found = self._repo_rev(repo_id, rev)
        if not found:
            return None
        repo, sha = found
        out = []
        for f in req.get("files", []):
            mode = self._mode(int(f["size"]), base64.b64decode(f.get("sample", "")))
            held = repo.commits[sha].get(f["path"])
            oid = None if held is None else held.sha256 if held.lfs else held.git_oid
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                        "oid": oid})
        return self._json({"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_id: str, req: dict) -> None:
        hub = self.hub
        if repo_id not in hub.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        objects = []
        for o in req.get("objects", []):
            obj = {"oid": o["oid"], "size": int(o["size"]), "authenticated": True}
            if o["oid"] not in hub.lfs_objects:
                obj["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                                  "verify": {"href": f"{hub.url}/lfs-verify/{o['oid']}"}}
            objects.append(obj)
        return self._reply(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                           {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, f"the bytes do not have sha256 {oid}")
        blob = self.hub.store_bytes(body, lfs=True)
        with self.hub.lock:
            self.hub.lfs_objects[oid] = blob.path
        return self._reply(200)

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        hub = self.hub
        found = self._repo_rev(repo_id, branch)
        if not found:
            return None
        repo, head = found
        if branch not in repo.refs:
            return self._error(400, None, f"{branch}: commits go to a branch")
        files = dict(repo.commits[head])
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, v = item["key"], item["value"]
            if key == "header":
                summary = v.get("summary", "")
                if v.get("parentCommit") not in (None, head):
                    return self._error(412, None, "A commit has happened since; the parent "
                                       "commit is not the head of the branch")
            elif key == "file":
                files[v["path"]] = hub.store_bytes(base64.b64decode(v["content"]), lfs=False)
            elif key == "lfsFile":
                held = hub.lfs_objects.get(v["oid"])
                if held is None:
                    return self._error(422, None, f"LFS object {v['oid']} was not uploaded")
                files[v["path"]] = dataclasses.replace(Blob.of(held), stored_lfs=True)
            elif key == "deletedFile":
                files.pop(v["path"], None)
            elif key == "deletedFolder":
                base = v["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(base)}
        sha = repo.commit(branch, files, summary)
        return self._json({"commitOid": sha, "success": True, "pullRequestUrl": None,
                           "commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{sha}"})


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


def private_hf_home(tmp_path, monkeypatch, *, cache: bool = False):
    """A private HF home under ``tmp_path`` for one test: Xet off (plain LFS), offline
    mode off, telemetry off, no token or endpoint from the environment; ``cache``: the
    Hub cache inside it too. Returns the home folder."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    for k, v in {"HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                 "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    if cache:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home
