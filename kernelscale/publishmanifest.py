"""The record ``kernelscale publish`` keeps in the repo of what each output put there, so
that publishing an output again deletes what it published before and is now gone
locally, and nothing else.

``kernelscale-published.json`` at the root of the branch maps each output path to the
files its last publish put in the repo, with their size, sha256 and git blob id::

    {"kernelscale_published": 1,
     "outputs": {"cfg/kernel": {"cfg/kernel/zarr.json":
                                {"size": 1234, "sha256": "<64 hex>", "git_oid": "<40 hex>"},
                                ...},
                 "cfg/report": {...}}}

An output path is where ``PATH`` lies in the repo (:attr:`~kernelscale.publishfiles.Plan.
output`): a file's path, a kernel's or report's folder (``FOLDER/kernel``), or the folder
a workdir's contents go to (``FOLDER``; "" is the repo root). Publishing an output deletes
a remote file only when all of these hold: that output's entry lists it; it lies under
the output path; it is not among the files published now; no other output's entry lists
it; and the branch still holds the bytes recorded (same size, and same sha256 for an LFS
file or git blob id for a regular one). kernelscale's own files at the root (the card, the
provenance file, this record, ``.gitattributes``) are never deleted.

A record that is missing deletes nothing. One without the ``kernelscale_published`` mark
(not valid JSON, or not kernelscale's) deletes nothing and is kept unchanged; an entry of
kernelscale's record that is malformed deletes nothing and is replaced or dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .publishfiles import LocalFile

#: the record's name, at the root of the branch
MANIFEST = "kernelscale-published.json"
_MARK = "kernelscale_published"
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "git_oid": re.compile(r"[0-9a-f]{40}")}


@dataclass(frozen=True)
class Recorded:
    """One file as an output's publish put it in the repo."""

    size: int
    sha256: str
    git_oid: str

    def held_by(self, remote: tuple[int, str | None, str] | None) -> bool:
        """Whether the remote (size, LFS sha256 or None, git oid) still holds these bytes."""
        if remote is None:
            return False
        size, sha256, oid = remote
        return size == self.size and (sha256 == self.sha256 if sha256 else
                                      oid == self.git_oid)

    @classmethod
    def parse(cls, obj) -> Recorded | None:
        if not isinstance(obj, dict):
            return None
        size, s256, oid = obj.get("size"), obj.get("sha256"), obj.get("git_oid")
        if (type(size) is not int or size < 0 or not isinstance(s256, str)
                or not isinstance(oid, str) or not _HEX["sha256"].fullmatch(s256)
                or not _HEX["git_oid"].fullmatch(oid)):
            return None
        return cls(size, s256, oid)


@dataclass
class Record:
    """output path -> (path in repo -> :class:`Recorded`); ``notes``: entries dropped as
    malformed when it was read."""

    outputs: dict[str, dict[str, Recorded]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, text: str) -> Record | None:
        """The record in ``text``; None when it is not kernelscale's (no mark)."""
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        if not isinstance(doc, dict) or doc.get(_MARK) != 1:
            return None
        rec = cls()
        outputs = doc.get("outputs")
        if not isinstance(outputs, dict):
            rec.notes.append(f"{MANIFEST}: its outputs are unreadable; nothing deleted")
            return rec
        for out, files in outputs.items():
            parsed = ({p: Recorded.parse(r) for p, r in files.items()}
                      if isinstance(files, dict) else None)
            if parsed is None or None in parsed.values():
                rec.notes.append(f"{MANIFEST}: the entry of {out or '(repo root)'!r} is "
                                 "malformed; nothing of it deleted")
                continue
            rec.outputs[out] = parsed
        return rec

    def with_output(self, output: str, files: list[LocalFile]) -> Record:
        """This record with ``output``'s entry replaced by ``files`` (hashed)."""
        outputs = dict(self.outputs)
        outputs[output] = {f.path_in_repo: Recorded(f.size, f.sha256, f.git_oid)
                           for f in files}
        return Record(outputs)

    def to_bytes(self) -> bytes:
        """The record as JSON, the same bytes for the same content."""
        doc = {_MARK: 1, "outputs": {
            out: {p: {"size": r.size, "sha256": r.sha256, "git_oid": r.git_oid}
                  for p, r in sorted(files.items())}
            for out, files in sorted(self.outputs.items())}}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def under(path: str, output: str) -> bool:
    """Does ``path`` (in the repo) lie at or under ``output`` ("" is the whole repo)?"""
    return output == "" or path == output or path.startswith(output + "/")


def stale(record: Record, output: str, published: set[str], remote: dict,
          keep: frozenset[str]) -> tuple[list[str], list[str]]:
    """The files to delete for ``output`` (see the module docstring), and a note for each
    recorded file that is kept because the branch's bytes changed since. ``published``:
    the paths published now; ``remote``: the branch's path -> (size, LFS sha256, git
    oid); ``keep``: paths never deleted."""
    mine = record.outputs.get(output, {})
    others = {p for out, files in record.outputs.items() if out != output for p in files}
    gone, notes = [], []
    for p, rec in sorted(mine.items()):
        if (p in published or p in others or p in keep or not under(p, output)
                or p not in remote):
            continue
        if rec.held_by(remote[p]):
            gone.append(p)
        else:
            notes.append(f"{p}: changed on the Hub since kernelscale published it; kept")
    return gone, notes
