"""What an ingest checks before it fetches anything, and the labels it records after.

* :func:`check_unchanged`: a file under a name the store holds must be the ingested one;
* :func:`check_labels`: ``--labels`` fit what is known of the store's shape, and are the
  labels the store holds, unless ``--labels-replace``;
* :func:`record_labels`: once the files are in, the labels go into the store
  (:meth:`~kernelscale.store.Store.record_labels`).

Both the ingest and its dry run (:mod:`kernelscale.ingestplan`) use them, so a dry run
fails where the ingest would.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BadInputError, StoreError
from .labels import Labels, is_labels_spec, labels_from_arrays, load_labels
from .sources import Source, SourceFile
from .store import Store
from .store_labelfile import labels_digest


def check_labels(spec: str, store_path: str | Path, *,
                 shape: tuple[int, int, int] | None = None,
                 replace: bool = False) -> tuple[Labels, str]:
    """The labels ``spec`` names, checked against what is known of the store's shape (the
    store at ``store_path``, else ``shape``: (n_test, n_train, classes)), and what
    recording them would do: ``new`` (the store holds none, or does not exist yet),
    ``same`` (it holds these), ``replace`` (it holds others, and ``replace`` allows it).
    Other labels than the store's are an error without ``replace``."""
    store = Store.open(store_path) if Store.exists(store_path) else None
    if store is not None:
        shape = (store.shape.n_test, store.shape.n_train, store.shape.classes)
    n_test, n_train, classes = shape if shape is not None else (None, None, None)
    labels = load_labels(spec, n_train=n_train, n_test=n_test, classes=classes)
    old = store.labels_record() if store else None
    if old is None:
        return labels, "new"
    if old.get("digest") == labels_digest(labels.train, labels.test, labels.class_names):
        return labels, "same"
    if not replace:
        raise BadInputError(f"{store_path}: holds other labels (recorded from "
                            f"{old.get('source')}) than {spec}; a store's labels are "
                            "replaced only with --labels-replace")
    return labels, "replace"


def record_labels(spec: str, labels: Labels, store_path: str | Path, *,
                  replace: bool = False) -> str:
    """Record ``labels`` (read from ``spec``) in the store at ``store_path``, checked
    against its shape; say what became of them."""
    if not Store.exists(store_path):
        raise StoreError(f"{store_path}: no store was created (no file ingested), so the "
                         f"labels {spec} were not recorded")
    store = Store.open(store_path, mode="a")
    s = store.shape
    labels = labels_from_arrays(labels.train, labels.test, source=spec,
                                n_train=s.n_train, n_test=s.n_test, classes=s.classes,
                                class_names=labels.class_names)
    where = labels_source(spec)
    with store.writer():
        what = store.record_labels(labels.train, labels.test, labels.class_names, where,
                                   replace=replace)
    return f"{what} from {where}"


def labels_source(spec: str) -> str:
    """How a labels spec is recorded: a file by its absolute path, a scheme as written."""
    return spec if is_labels_spec(spec) else str(Path(spec).resolve())


def check_unchanged(store_path: Path, files: list[SourceFile], src: Source) -> None:
    """Refuse a source whose file under an ingested name is not the ingested one: a
    different sha256 where the source lists it (the Hub), a different size otherwise.
    Ingesting around it would silently keep a version the source no longer has."""
    if not Store.exists(store_path):
        return
    ingested = {f["name"]: f for f in Store.open(store_path).manifest["files"]}
    blocks = [(f["source_runs"], f["name"]) for f in ingested.values() if "source_runs" in f]
    for f in files:
        old = ingested.get(f.name)
        if old is None and f.runs is not None:  # a block of a Zarr group: GROUP[runs A:B]
            a, b = f.runs
            group = f.name.rsplit("[", 1)[0]
            for (c, d), name in blocks:
                if name.rsplit("[", 1)[0] == group and a < d and c < b:
                    raise BadInputError(f"{src}: {f.name} overlaps the ingested {name}: "
                                        "the group grew or was rechunked since, so its "
                                        "blocks of runs are not the ingested ones; ingest "
                                        "it into a new store")
        if not old:
            continue
        where = f" (ingested at commit {old['commit']})" if old.get("commit") else ""
        if f.sha256 and old.get("sha256") != f.sha256 and old.get("lfs_sha256", f.sha256) \
                != f.sha256:
            raise BadInputError(f"{src}: {f.name}: sha256 {f.sha256} differs from the "
                                f"ingested {old.get('lfs_sha256') or old['sha256']}{where}; "
                                "a store holds one version of each file: ingest this "
                                "revision into a new store, or leave the file out with "
                                "--glob")
        if not f.sha256 and old.get("size") is not None and f.size != old["size"]:
            raise BadInputError(f"{src}: {f.name}: {f.size} bytes, but the ingested file "
                                f"(sha256 {old['sha256']}) had {old['size']}; a store holds "
                                "one version of each file: ingest the changed files into a "
                                "new store")
