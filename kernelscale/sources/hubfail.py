"""What a failed Hub request means: retry it, or stop with one line saying why."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, X-Error-Code) of the first response found along the exception chain."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code, resp.headers.get("X-Error-Code")
        e = e.__cause__ or e.__context__
    return None, None


def exception_chain(exc: BaseException) -> list[BaseException]:
    out, e = [], exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


#: exception class names (any HTTP stack huggingface_hub has used) meaning "try again"
_TRANSIENT_NAMES = {"TimeoutException", "NetworkError", "RemoteProtocolError", "ConnectError",
                    "ReadError", "WriteError", "ConnectTimeout", "ReadTimeout",
                    "ChunkedEncodingError", "ProtocolError", "Timeout"}


def is_transient(exc: BaseException) -> bool:
    status, _ = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    for e in exception_chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TRANSIENT_NAMES or isinstance(e, ConnectionError | TimeoutError):
            return True
        # A body shorter than announced: the connection dropped mid-transfer.
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return True
    return False


def explain(exc: BaseException, commit: str | None) -> str:
    """One line saying what went wrong and its likely cause; never the token."""
    names = {c.__name__ for e in exception_chain(exc) for c in type(e).__mro__}
    if "OfflineModeIsEnabled" in names:
        return "the Hub is not reachable in offline mode (unset HF_HUB_OFFLINE)"
    status, code = http_status(exc)
    at = f" at commit {commit}" if commit else ""
    if code == "RevisionNotFound":
        return f"HTTP {status}: revision not found (wrong branch, tag or commit?)"
    if code == "RepoNotFound":
        return (f"HTTP {status}: repository not found (wrong OWNER/NAME, or a private or "
                "gated repo and no valid token: set HF_TOKEN or run `hf auth login`)")
    if status == 401:
        return ("HTTP 401 unauthorized: the repo is private or gated and no valid token was "
                "sent (set HF_TOKEN or run `hf auth login`)")
    if status == 403:
        return ("HTTP 403 forbidden: the token has no access (gated repo: accept its "
                "conditions on the Hub; or a token without read permission)")
    if status == 404:
        return f"HTTP 404: not found{at} (wrong path or revision?)"
    if status is not None:
        return f"HTTP {status}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def safe_endpoint(url: str) -> str:
    """The endpoint without any user:password part, fit for the manifest."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", "")).rstrip("/")
