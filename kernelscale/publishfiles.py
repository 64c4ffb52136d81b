"""What ``kernelscale publish`` uploads, and where it goes in the repo.

From ``PATH`` to ``hf://datasets/OWNER/NAME[@BRANCH][/FOLDER]``:

* a kernel (full or top-K), a report folder (``index.html`` + ``report.json``) or a single
  file keeps its name: ``kernel/`` goes to ``FOLDER/kernel/``; any other folder (a job's
  workdir) is uploaded as its contents into ``FOLDER/``;
* every file below, except hidden files and folders (``.lock``, ``.locks/``,
  ``.checkpoints/``, ``.partial/``, temp files ``.NAME.*.tmp``, ``.git``, ``.env`` ...)
  and files ending ``.tmp``, ``.incomplete`` or ``.lock``; a kernel's ``.done/`` tile
  markers are uploaded (a reader verifies the chunks of the tiles they name);
* never a store (its logits) nor the local folder a store was ingested from: a workdir's
  ``store/`` is skipped and said so; the card lists the store's source files instead.

A kernel is uploaded only when it is complete and passes ``kernelscale verify``. Results
files (``evaluate --json``, a job's ``results.json``) and reports found on the way are
noted for the dataset card (:mod:`kernelscale.card`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .card import CardInputs, KernelInfo
from .errors import BadInputError, KernelscaleError

_TEMP_SUFFIXES = (".tmp", ".incomplete", ".lock")


@dataclass
class LocalFile:
    """One file to upload: where it goes in the repo, and its bytes (a local file, or
    content kernelscale generated)."""

    path_in_repo: str
    source: Path | None = None
    data: bytes | None = None
    size: int = 0
    sha256: str = ""
    git_oid: str = ""

    def hash(self) -> LocalFile:
        s256, size = hashlib.sha256(), 0
        if self.data is not None:
            size = len(self.data)
            s1 = hashlib.sha1(b"blob %d\0" % size)
            s256.update(self.data)
            s1.update(self.data)
        else:
            size = self.source.stat().st_size
            s1 = hashlib.sha1(b"blob %d\0" % size)
            with open(self.source, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    s256.update(block)
                    s1.update(block)
        self.size, self.sha256, self.git_oid = size, s256.hexdigest(), s1.hexdigest()
        return self

    def same_as(self, remote: tuple[int, str | None, str] | None) -> bool:
        """Whether the remote (size, LFS sha256 or None, git oid) holds these bytes."""
        if remote is None:
            return False
        size, sha256, oid = remote
        return size == self.size and (sha256 == self.sha256 if sha256 else oid == self.git_oid)


@dataclass
class Plan:
    """What ``PATH`` holds, as it will lie in the repo."""

    files: list[LocalFile] = field(default_factory=list)
    card: CardInputs = field(default_factory=CardInputs)
    notes: list[str] = field(default_factory=list)  #: what was left out, and why
    #: where ``PATH`` lies in the repo: a file's path, a kernel's or report's folder, or
    #: the folder a workdir's contents go to ("" the repo root)
    output: str = ""



def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


def _is_report(p: Path) -> bool:
    return (p / "index.html").is_file() and (p / "report.json").is_file()


def collect(path: str | os.PathLike, folder: str = "") -> Plan:
    """The files of ``path`` and where they go under ``folder`` (see the module
    docstring); kernels are checked complete and intact, stores and their local sources
    left out. Raises :class:`BadInputError` for a missing path or a damaged kernel."""
    from .store import Store

    root = Path(path)
    if not root.exists():
        raise BadInputError(f"{root}: no such file or folder")
    plan = Plan()
    base = folder.strip("/")
    if root.is_file():
        plan.output = _join(base, root.name)
        plan.files.append(LocalFile(plan.output, root))
        _note_json(plan, root, _join(base, root.name))
        return plan
    if Store.exists(root):
        raise BadInputError(f"{root}: is a store (the ensemble's logits); publish the kernel, "
                            "results or report computed from it")
    named = _kernel(root) is not None or _is_report(root)
    top = plan.output = _join(base, root.name) if named else base
    sources = _store_sources(root)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        rel = d.relative_to(root).as_posix()
        kern = _kernel(d)
        keep = []
        for n in sorted(dirnames):
            sub = d / n
            if sub.is_symlink():
                plan.notes.append(f"{sub}: a symbolic link to a folder; not followed")
            elif Store.exists(sub):
                plan.notes.append(f"{sub}: a store (the logits); not uploaded")
            elif _is_source(sub, sources):
                plan.notes.append(f"{sub}: the folder a store was ingested from; not uploaded")
            elif not _skipped(n) or (n == ".done" and kern is not None):
                keep.append(n)  # a kernel's tile markers: its chunks are checked by them
        dirnames[:] = keep
        if kern is not None:
            _check_kernel(kern, d)
            plan.card.kernels.append(KernelInfo.of(_join(top, rel), kern))
        if _is_report(d):
            plan.card.reports.append(_join(top, rel))
        for n in sorted(filenames):
            f = d / n
            if _skipped(n) or not f.is_file():  # is_file follows a link to a file
                continue
            where = _join(top, rel, n)
            plan.files.append(LocalFile(where, f))
            _note_json(plan, f, where)
    if not plan.files:
        raise BadInputError(f"{root}: nothing to publish (no file that is not hidden, "
                            "temporary, a store or a store's source)")
    return plan


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p and p != ".")


def _kernel(p: Path):
    from .output import KernelOutput

    if not (p / "zarr.json").is_file():
        return None
    try:
        return KernelOutput.open(p, mode="r")
    except KernelscaleError:
        return None


def _check_kernel(kern, path: Path) -> None:
    from .integrity import verify_kernel

    if not kern.attrs.get("complete"):
        raise BadInputError(f"{path}: the kernel is not complete; finish it (the same "
                            "`kernelscale kernel` command) before publishing")
    rep = verify_kernel(path)
    if rep.problems:
        raise BadInputError(f"{rep.problems[0].line()} ({len(rep.problems)} problem(s); "
                            "not published)")


def _store_sources(root: Path) -> tuple[set[Path], list[tuple[str, int]]]:
    """How to know the local folders the stores under ``root`` were ingested from: the
    paths their manifests record, and (for a workdir copied or moved since) each store's
    first file (name relative to its source folder, size)."""
    from .atomic import read_json
    from .store import Store

    paths, firsts = set(), []
    for m in root.rglob("manifest.json"):
        if not Store.exists(m.parent):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            man = read_json(m)
            local = [s for s in man.get("sources", []) if s.get("kind") != "hub"]
            paths.update(Path(s["path"]).resolve() for s in local if s.get("path"))
            if local and man.get("files"):
                f = man["files"][0]
                firsts.append((str(f["name"]), int(f["size"])))
    return paths, firsts


def _is_source(folder: Path, sources: tuple[set[Path], list[tuple[str, int]]]) -> bool:
    paths, firsts = sources
    if folder.resolve() in paths:
        return True
    for name, size in firsts:
        f = folder / name
        if f.is_file() and f.stat().st_size == size:
            return True
    return False


def _note_json(plan: Plan, f: Path, where: str) -> None:
    """Results (``evaluate --json``, a job's results.json) and reports go on the card."""
    import json

    if f.suffix != ".json" or f.stat().st_size > 64 << 20:
        return
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return
    if isinstance(doc, dict) and {"knn_accuracy", "ensemble_accuracy"} <= set(doc):
        plan.card.results.append((where, doc))
