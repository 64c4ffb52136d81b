"""``kernelscale publish``: a kernel, a results file, a report or a job's workdir uploaded
to a Hugging Face Hub dataset repo, with a dataset card.

What is uploaded and where it goes is :mod:`kernelscale.publishfiles`' (in short: the
outputs, never a store, its sources, hidden, lock, checkpoint or temp files). Beside it,
at the repo root: ``README.md``, the dataset card (:mod:`kernelscale.card`), unless
``PATH`` brings its own or the repo holds one kernelscale did not write (kept as is), and
``kernelscale-provenance.json``, every source file with its sha256.

Re-publishing the same content is a no-op: each local file's size and sha256 (the Hub's
LFS oid) or git blob id (a regular file's oid) is compared with the branch's listing
(``list_repo_tree``); only files that differ are committed, and when none does nothing
is written. Files an earlier publish of the same output put in the repo and that are
gone from ``PATH`` now are deleted in the same commit; nothing else ever is (the record
kept in ``kernelscale-published.json``: :mod:`kernelscale.publishmanifest`). The upload
itself is ``huggingface_hub``'s ``create_commit`` of ``CommitOperationAdd`` and
``CommitOperationDelete`` operations (the library chooses regular, LFS or Xet transfers),
on top of the commit that was compared (``parent_commit``), so a concurrent change fails
the commit instead of being overwritten unseen. The token is the library's (``HF_TOKEN``,
``hf auth login``); it is never printed or stored.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .card import CARD_MARKER, CardInputs, dataset_card, provenance_json
from .errors import ConfigError, KernelscaleError
from .hubkernel import hub_progress
from .publishfiles import LocalFile, collect
from .publishmanifest import MANIFEST, Record, stale
from .sources.hub import HubError
from .sources.hubfail import explain, http_status, is_transient
from .sources.hubspec import HubSpec, parse_hub_spec
from .units import format_bytes
from .version import __version__

#: files kernelscale writes beside what it uploads
CARD, PROVENANCE = "README.md", "kernelscale-provenance.json"


@dataclass(frozen=True)
class PublishConfig:
    """``path``: what to publish; ``target``: ``hf://datasets/OWNER/NAME[@BRANCH][/FOLDER]``;
    ``create``: create the repo when missing (``private``: as a private one; an existing
    public repo is refused when ``private`` is asked); ``dry_run``: compare, upload
    nothing."""

    path: Path
    target: str
    revision: str | None = None
    message: str | None = None
    create: bool = False
    private: bool = False
    license: str = "other"
    dry_run: bool = False
    show_progress: bool = True


@dataclass
class PublishSummary:
    target: str
    branch: str
    uploaded: list[LocalFile]
    unchanged: int
    commit: str | None
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    #: paths in the repo deleted (or, in a dry run, to delete): see the module docstring
    deleted: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f"{self.target} (branch {self.branch})"
        if not self.uploaded and not self.deleted:
            return (f"publish: {where}: up to date, {self.unchanged} file(s) unchanged; "
                    "nothing committed")
        size = format_bytes(sum(f.size for f in self.uploaded))
        gone = ""
        if self.deleted:
            verb = "would delete" if self.dry_run else "deleted"
            gone = f", {verb} {len(self.deleted)} file(s) published before and gone locally"
        if self.dry_run:
            return (f"publish: {where}: would upload {len(self.uploaded)} file(s) ({size})"
                    f"{gone}, {self.unchanged} unchanged (dry run: nothing sent)")
        return (f"publish: {where}: uploaded {len(self.uploaded)} file(s) ({size}){gone}, "
                f"{self.unchanged} unchanged; commit {self.commit}")


# ----------------------------------------------------------------------- remote side

def _hub_error(e: Exception, target: str, writing: bool = False) -> HubError | None:
    """A Hub failure as one line naming ``target`` (a refused write says the token lacks
    write access); None for an error that is not the Hub's."""
    status, _ = http_status(e)
    if writing and status in (401, 403):
        why = ("no valid token was sent" if status == 401 else
               "the token lacks write access to this repo")
        return HubError(f"{target}: HTTP {status}: {why}; publishing needs a token with "
                        "write permission (HF_TOKEN or `hf auth login`)")
    if writing and status == 412:
        return HubError(f"{target}: HTTP 412: the branch moved while publishing (another "
                        "commit landed); nothing was committed: run the same command again")
    if status is None and not is_transient(e) and not isinstance(e, ValueError | OSError):
        return None
    return HubError(f"{target}: {explain(e, None)}")


@contextlib.contextmanager
def _hub_errors(target: str, writing: bool = False):
    try:
        yield
    except KernelscaleError:
        raise
    except Exception as e:
        err = _hub_error(e, target, writing)
        if err is None:
            raise
        raise err from None


def _info(api, spec: HubSpec, revision: str | None = None):
    """``repo_info`` of the repo (``revision`` None) or of a revision; None when that is
    missing."""
    try:
        return api.repo_info(spec.repo_id, repo_type="dataset", revision=revision)
    except Exception as e:
        _, code = http_status(e)
        if code == ("RepoNotFound" if revision is None else "RevisionNotFound"):
            return None
        err = _hub_error(e, str(spec))
        if err is None:
            raise
        raise err from None


def _target(cfg: PublishConfig) -> tuple[HubSpec, str]:
    spec = parse_hub_spec(cfg.target)
    if cfg.revision and spec.revision and cfg.revision != spec.revision:
        raise ConfigError(f"{spec}: --revision {cfg.revision} contradicts the revision in "
                          "the target")
    branch = cfg.revision or spec.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", branch):
        raise ConfigError(f"{spec}: {branch} is a commit; publishing commits to a branch "
                          "(--revision BRANCH)")
    return spec, branch


def _remote(api, spec: HubSpec, branch: str, cfg: PublishConfig, notes: list[str]
            ) -> tuple[str | None, dict]:
    """The branch's head commit and its files: path -> (size, LFS sha256, git oid).
    Creates the repo (when ``create``) and the branch when missing, unless a dry run
    (which then compares with an empty repo)."""
    from huggingface_hub.hf_api import RepoFile

    target = f"hf://datasets/{spec.repo_id}"
    info = _info(api, spec)
    if info is None:
        if not cfg.create:
            raise HubError(f"{target}: repository not found (pass --create to create it; or "
                           "check OWNER/NAME and that the token can see it)")
        vis = "private" if cfg.private else "public"
        if cfg.dry_run:
            notes.append(f"{target}: would be created ({vis})")
            return None, {}
        with _hub_errors(target, writing=True):
            api.create_repo(spec.repo_id, repo_type="dataset", private=cfg.private,
                            exist_ok=True)
        notes.append(f"{target}: created ({vis})")
    elif cfg.private and not info.private:
        raise HubError(f"{target}: exists and is public; --private refuses to publish into "
                       "it (change its visibility on the Hub first)")
    head = _info(api, spec, branch)
    if head is None:
        if cfg.dry_run:
            notes.append(f"{target}: branch {branch} would be created")
            return None, {}
        with _hub_errors(target, writing=True):
            api.create_branch(spec.repo_id, branch=branch, repo_type="dataset")
        notes.append(f"{target}: created branch {branch} from the default branch")
        head = _info(api, spec, branch)
        if head is None:
            raise HubError(f"{target}: branch {branch} is missing after creating it")
    files = {}
    with _hub_errors(target):
        for e in api.list_repo_tree(spec.repo_id, recursive=True, revision=head.sha,
                                    repo_type="dataset"):
            if isinstance(e, RepoFile):
                files[e.path] = (int(e.size), e.lfs.sha256 if e.lfs else None, e.blob_id)
    return str(head.sha), files


def _remote_text(api, spec: HubSpec, commit: str, name: str) -> str:
    """A small file of the repo at ``commit``, through a temporary cache."""
    with tempfile.TemporaryDirectory(prefix="kernelscale-publish-") as tmp, \
            _hub_errors(f"hf://datasets/{spec.repo_id}/{name}"):
        p = api.hf_hub_download(spec.repo_id, name, repo_type="dataset", revision=commit,
                                cache_dir=tmp)
        return Path(p).read_text(encoding="utf-8", errors="replace")


def _earlier(api, spec: HubSpec, commit: str) -> CardInputs | None:
    """What an earlier publish recorded in ``kernelscale-provenance.json``."""
    try:
        return CardInputs.from_json(json.loads(_remote_text(api, spec, commit, PROVENANCE)))
    except ValueError:
        return None


# ----------------------------------------------------------------------------- publish

def publish(cfg: PublishConfig, *, endpoint: str | None = None,
            token: str | bool | None = None) -> PublishSummary:
    """Upload what ``cfg.path`` holds (see the module docstring) to ``cfg.target``;
    commit only files whose content differs from the branch's."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    spec, branch = _target(cfg)
    plan = collect(cfg.path, spec.prefix)
    target = f"hf://datasets/{spec.repo_id}"
    api = HfApi(endpoint=endpoint, token=token)
    notes = list(plan.notes)
    head, remote = _remote(api, spec, branch, cfg, notes)
    files = [f.hash() for f in plan.files]
    mine = {f.path_in_repo for f in files}
    record, gone = _record(api, spec, head, remote, plan.output, files, notes)
    remote = {p: r for p, r in remote.items() if p not in gone}
    if CARD in mine:
        notes.append(f"{CARD}: {cfg.path} brings its own; no card written")
    elif CARD in remote and head and CARD_MARKER not in _remote_text(api, spec, head, CARD):
        notes.append(f"{target}/{CARD}: not written by kernelscale; kept, no card written")
    else:
        card = plan.card
        card.repo_id, card.branch, card.license = spec.repo_id, branch, cfg.license
        card.contents = _contents(files, remote)
        earlier = _earlier(api, spec, head) if PROVENANCE in remote and head else None
        if earlier is not None:
            card = card.merged_with(earlier, set(remote) | mine)
        files.append(LocalFile(CARD, data=dataset_card(card).encode()).hash())
        files.append(LocalFile(PROVENANCE, data=provenance_json(card).encode()).hash())
    if record is not None:
        files.append(LocalFile(MANIFEST, data=record.to_bytes()).hash())
    todo = [f for f in files if not f.same_as(remote.get(f.path_in_repo))]
    summary = PublishSummary(target + (f"/{spec.prefix}" if spec.prefix else ""), branch,
                             todo, len(files) - len(todo), None, cfg.dry_run, notes, gone)
    if not (todo or gone) or cfg.dry_run:
        return summary
    ops = [CommitOperationAdd(f.path_in_repo, f.data if f.data is not None else str(f.source))
           for f in todo]
    ops += [CommitOperationDelete(p) for p in gone]
    message = cfg.message or f"Publish {Path(cfg.path).name} with kernelscale {__version__}"
    with hub_progress(cfg.show_progress), _hub_errors(target, writing=True):
        info = api.create_commit(spec.repo_id, operations=ops, commit_message=message,
                                 repo_type="dataset", revision=branch, parent_commit=head)
    summary.commit = str(info.oid)
    return summary


def _record(api, spec: HubSpec, head: str | None, remote: dict, output: str,
            files: list[LocalFile], notes: list[str]) -> tuple[Record | None, list[str]]:
    """The record to write once ``files`` are published as ``output`` (None: the repo's
    is not kernelscale's, so it is kept and none written), and the remote files to delete
    (see :mod:`kernelscale.publishmanifest`)."""
    where = f"hf://datasets/{spec.repo_id}/{MANIFEST}"
    if any(f.path_in_repo == MANIFEST for f in files):
        notes.append(f"{MANIFEST}: the path brings its own; nothing deleted, no record "
                     "written")
        return None, []
    if MANIFEST not in remote or head is None:
        return Record().with_output(output, files), []
    record = Record.load(_remote_text(api, spec, head, MANIFEST))
    if record is None:
        notes.append(f"{where}: not kernelscale's record (or unreadable); kept, nothing "
                     "deleted")
        return None, []
    notes.extend(record.notes)
    gone, kept = stale(record, output, {f.path_in_repo for f in files}, remote,
                       frozenset({CARD, PROVENANCE, MANIFEST, ".gitattributes"}))
    notes.extend(kept)
    return record.with_output(output, files), gone


def _contents(files: list[LocalFile], remote: dict) -> dict[str, tuple[int, int]]:
    """Top-level entries of the repo once published: name -> (files, bytes); the card
    and kernelscale's provenance file left out."""
    sizes = {p: r[0] for p, r in remote.items()}
    sizes.update({f.path_in_repo: f.size for f in files})
    out: dict[str, list[int]] = {}
    for p, n in sizes.items():
        if p in (CARD, PROVENANCE, MANIFEST, ".gitattributes"):
            continue
        top = p.split("/")[0] + ("/" if "/" in p else "")
        acc = out.setdefault(top, [0, 0])
        acc[0] += 1
        acc[1] += n
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def print_notes(summary: PublishSummary) -> None:
    for n in summary.notes:
        print(f"publish: {n}", file=sys.stderr)
