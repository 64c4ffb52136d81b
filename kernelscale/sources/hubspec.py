"""Hub specs, ``hf://datasets/OWNER/NAME[@REVISION][/PATH/PREFIX]``, and the globs that
select files inside them. Pure: no network."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..errors import ConfigError

SCHEME = "hf://"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://datasets/OWNER/NAME[@REVISION][/PATH/PREFIX]``."""

    repo_id: str  #: OWNER/NAME
    revision: str | None  #: as written (branch, tag or commit), None for the default
    prefix: str  #: folder inside the repo, "" for the whole repo

    def __str__(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{SCHEME}datasets/{self.repo_id}{rev}" + (f"/{self.prefix}" if self.prefix else "")

    def label(self, path: str) -> str:
        """How a file of the repo is named in messages."""
        return f"{SCHEME}datasets/{self.repo_id}/{path}"


def is_hub_spec(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_hub_spec(text: str) -> HubSpec:
    """Parse ``hf://datasets/OWNER/NAME[@REVISION][/PATH/PREFIX]``; raises ConfigError.

    A revision holding ``/`` (``refs/pr/1``) is written URL-encoded: ``@refs%2Fpr%2F1``.
    """
    if not is_hub_spec(text):
        raise ConfigError(f"{text}: not a Hub source (expected hf://datasets/OWNER/NAME...)")
    kind, _, rest = text[len(SCHEME):].partition("/")
    if kind != "datasets":
        raise ConfigError(f"{text}: only dataset repos are supported "
                          "(hf://datasets/OWNER/NAME[@REVISION][/PATH])")
    parts = rest.split("/")
    if len(parts) < 2:
        raise ConfigError(f"{text}: expected hf://datasets/OWNER/NAME[@REVISION][/PATH]")
    owner, (name, at, rev) = parts[0], parts[1].partition("@")
    for what, v in (("owner", owner), ("repo name", name)):
        if not _NAME.match(v):
            raise ConfigError(f"{text}: invalid {what} {v!r}")
    if at and not rev:
        raise ConfigError(f"{text}: empty revision after '@'")
    prefix = [p for p in parts[2:] if p]
    if any(p in (".", "..") for p in prefix):
        raise ConfigError(f"{text}: the path may not contain '.' or '..'")
    return HubSpec(f"{owner}/{name}", unquote(rev) if at else None, "/".join(prefix))


def glob_regex(pattern: str) -> re.Pattern:
    """A glob over '/'-separated paths: ``**`` spans folders, ``*`` and ``?`` do not."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1:j]
            neg = body.startswith("!")
            body = body[neg:].replace("\\", "\\\\")
            out.append("[" + ("^" if neg else "\\" if body.startswith("^") else "") + body + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def literal_dir(pattern: str) -> str:
    """The folders a glob names literally before its first wildcard ('' if none)."""
    parts = pattern.split("/")[:-1]
    lit = []
    for p in parts:
        if any(c in p for c in "*?["):
            break
        lit.append(p)
    return "/".join(lit)


def inside(path: str, folder: str) -> bool:
    return not folder or path == folder or path.startswith(folder + "/")
