"""The ``kernelscale info`` text of a store: shape, fingerprint, labels, sources, files."""

from __future__ import annotations

from .store import Store
from .units import format_bytes


def describe_store(store: Store) -> str:
    """Lines a person reads: the store's shape and fingerprint, zero-variance entries,
    recorded labels, sources, every ingested file (sha256, run range, size) and every
    rejected one with its reason."""
    s = store.shape
    m = store.manifest
    lines = [f"store {store.root}",
             f"  runs {store.runs}  test {s.n_test}  train {s.n_train}  classes {s.classes}"
             f"  dtype {s.dtype}  run_chunk {s.run_chunk}  statistics of {store.transform}",
             f"  fingerprint {store.fingerprint()}"]
    if store.runs >= 2:
        zt, zr = store.stats("test").zero_variance(), store.stats("train").zero_variance()
        lines.append(f"  zero-variance entries: test {zt}  train {zr}")
    lab = store.labels_record()
    if lab is not None:
        names = ", ".join(lab["class_names"]) if lab.get("class_names") else "unnamed"
        lines.append(f"  labels from {lab['source']} (classes: {names}; {lab['file']})")
    for src in m["sources"]:
        lines.append("  source " + "  ".join(f"{k}={v}" for k, v in sorted(src.items())))
    lines.append(f"  files {len(m['files'])}:")
    for f in m["files"]:
        extra = f"  commit {f['commit']}" if f.get("commit") else ""
        lines.append(f"    {f['sha256']}  runs {f['run_start']}:{f['run_stop']}  "
                     f"{format_bytes(f['size'])}  {f['name']}{extra}")
    if m["rejected"]:
        lines.append(f"  rejected {len(m['rejected'])}:")
        for r in m["rejected"]:
            lines.append(f"    {r['name']}: {r['reason']}")
    return "\n".join(lines)
