"""A job's ``[compare]`` and ``[publish]`` stages, for ``kernelscale run`` and the Slurm
gather job.

**compare**: the job's kernel against each ``[compare]`` kernel (a local one, or an
``hf://`` one fetched and verified by :mod:`kernelscale.hubkernel`), with the [compare]
labels, else the [evaluate] ones, else the store's recorded ones, else none; each
comparison's table printed and written as ``compare.json`` and ``compare.png`` into its
folder (:meth:`~kernelscale.config.JobConfig.compare_targets`). The first is the one the
report shows.

**publish**: each output of :meth:`~kernelscale.config.JobConfig.publish_items` uploaded
by :func:`kernelscale.publish.publish` to the ``[publish]`` repo: one commit per output
whose files differ from the branch, none when nothing does. When all are published,
:data:`RECORD` in the workdir (a hidden file, never uploaded) names the repo, branch and
outputs, so that ``status`` and ``submit`` count the stage as done; it is removed before
publishing, so a publish that failed or was killed half-way leaves none and the same
command publishes what is missing. A refused or failed upload is one
:class:`~kernelscale.sources.hub.HubError` line saying how to publish again; what the
earlier stages wrote stays. The token is ``huggingface_hub``'s and is never printed or
stored.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .atomic import atomic_write_json, read_json, remove_stale_temps
from .config import JobConfig
from .labels import Labels
from .sources.hub import HubError

#: the record of the job's last successful publish, in its workdir
RECORD = ".kernelscale-published.json"


# ------------------------------------------------------------------------- compare

def run_compare(cfg: JobConfig, quiet: bool) -> None:
    """Compare the job's kernel with each [compare] kernel; print and write each."""
    from .compare import JSON_NAME, compare_kernels, write_comparison

    labels = _labels(cfg)
    for spec, out in cfg.compare_targets():
        cmp = compare_kernels(cfg.kernel_path, spec, labels=labels, show_progress=not quiet,
                              **cfg.compare_options())
        print(cmp.table())
        if out is not None:
            # a gather killed while writing compare.json left its temp: the rerun tidies
            remove_stale_temps(out / JSON_NAME)
            written = write_comparison(cmp, out)
            print(f"compare: {written[0]}, {written[1]}", file=sys.stderr)


def compared(cfg: JobConfig) -> bool:
    """Is there a ``compare.json`` for every [compare] kernel (that writes one)?"""
    return all(out is None or (out / "compare.json").is_file()
               for _, out in cfg.compare_targets())


def _labels(cfg: JobConfig) -> Labels | None:
    from .labels import load_labels, store_labels
    from .store import Store

    spec = cfg.compare_labels()
    if spec is not None:
        return load_labels(spec)
    if Store.exists(cfg.store_path) and Store.open(cfg.store_path).labels_record():
        return store_labels(cfg.store_path)
    return None


# ------------------------------------------------------------------------- publish

def run_publish(cfg: JobConfig, quiet: bool) -> None:
    """Publish the job's outputs (see the module docstring)."""
    from .publish import print_notes, publish

    record = cfg.workdir / RECORD
    record.unlink(missing_ok=True)
    remove_stale_temps(record)
    commits = []
    for pc in cfg.publish_configs(show_progress=not quiet):
        try:
            s = publish(pc)
        except HubError as e:
            again = shlex.join(["kernelscale", "run", str(cfg.path),
                                *[x for item in cfg.sets for x in ("--set", item)],
                                "--workdir", str(cfg.workdir), "--only", "publish"])
            raise HubError(f"{e} (publish stage: the job's outputs are kept; once fixed, "
                           f"`{again}` publishes them)") from None
        print_notes(s)
        print(s.line())
        commits.append(s.commit)
    atomic_write_json(record, {**_identity(cfg), "commits": commits})


def published(cfg: JobConfig) -> bool:
    """Did the last publish of the workdir finish, to the job's repo and branch, with the
    outputs the job now publishes?"""
    try:
        rec = read_json(cfg.workdir / RECORD)
    except (OSError, ValueError):
        return False
    want = _identity(cfg)
    return isinstance(rec, dict) and all(rec.get(k) == v for k, v in want.items())


def _identity(cfg: JobConfig) -> dict:
    p = cfg.publish
    return {"repo": p.repo, "revision": p.revision,
            "outputs": [[what, str(Path(path).resolve())]
                        for what, path in cfg.publish_items()]}
