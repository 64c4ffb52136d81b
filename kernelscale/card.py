"""The dataset card (``README.md``) and provenance file that ``kernelscale publish`` writes
beside a published kernel.

The card holds YAML metadata (license, tags, size category), what the repo holds, the
accuracy table of each results file, where each kernel came from (source repo and commit
or local folder, runs, source files with their sha256 from the store's manifest,
precision, transform, device, versions) and how to load a kernel with kernelscale, zarr
and xarray. ``kernelscale-provenance.json`` lists every source file (the card shows the
first :data:`CARD_FILES`). Both are functions of their inputs only (no clock), so
publishing the same content again writes the same bytes.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

from .units import format_bytes
from .version import __version__

#: the line that marks a README.md as written by kernelscale (and so its to rewrite)
CARD_MARKER = "<!-- kernelscale:card (written by `kernelscale publish`; rewritten by it) -->"
#: source files listed on the card itself
CARD_FILES = 20
PROVENANCE_SCHEMA = "kernelscale-publish-provenance"
TAGS = ["kernelscale", "ensemble", "kernel", "k-nearest-neighbors", "zarr"]
#: the Hub's size categories, by number of examples (kernel rows)
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
         (1_000_000_000, "100M<n<1B")]


@dataclass
class StoreInfo:
    """What a store's manifest says of its inputs: sources, files (name, sha256, size,
    runs; commit and LFS sha256 of a Hub file), run count, shape."""

    fingerprint: str
    runs: int
    shape: dict
    sources: list[dict]
    files: list[dict]

    @classmethod
    def read(cls, path: str | None, fingerprint: str | None) -> StoreInfo | None:
        """The store at ``path`` if it is there and still of ``fingerprint`` (a store
        changed since the kernel was computed describes other inputs)."""
        from .errors import KernelscaleError
        from .store import Store

        if not path or not fingerprint or not Store.exists(path):
            return None
        try:
            st = Store.open(path)
        except (KernelscaleError, OSError, ValueError):
            return None
        if st.fingerprint() != fingerprint:
            return None
        keep = ("name", "sha256", "size", "runs", "run_start", "run_stop", "commit",
                "hub_path", "lfs_sha256")
        files = [{k: f[k] for k in keep if k in f} for f in st.manifest["files"]]
        sources = []
        for s in st.manifest.get("sources", []):
            s = dict(s)
            if s.get("kind") != "hub" and s.get("path"):  # a local path: its name only
                s["folder"] = Path(s.pop("path")).name
            sources.append(s)
        return cls(fingerprint, st.runs, dict(st.shape.__dict__), sources, files)


@dataclass
class KernelInfo:
    """A kernel as published: its folder in the repo, identity, device, store."""

    path: str
    identity: dict
    fingerprint: str
    device: str | None
    store: StoreInfo | None

    @classmethod
    def of(cls, path: str, kern) -> KernelInfo:
        from .provenance import kernel_devices

        ident = dict(kern.attrs.get("identity", {}))
        return cls(path, ident, kern.fingerprint(), kernel_devices(kern),
                   StoreInfo.read(kern.attrs.get("store"), ident.get("store_fingerprint")))


@dataclass
class CardInputs:
    repo_id: str = ""
    branch: str = "main"
    license: str = "other"
    kernels: list[KernelInfo] = field(default_factory=list)
    results: list[tuple[str, dict]] = field(default_factory=list)  #: path, results JSON
    reports: list[str] = field(default_factory=list)  #: report folders in the repo
    contents: dict[str, tuple[int, int]] = field(default_factory=dict)  #: top -> files, bytes
    known_stores: dict[str, StoreInfo] = field(default_factory=dict)  #: of earlier publishes

    def stores(self) -> dict[str, StoreInfo]:
        """Every store known, by fingerprint: the kernels', the results', then those an
        earlier publish recorded."""
        out = {k.store.fingerprint: k.store for k in self.kernels if k.store}
        for _, doc in self.results:
            prov = doc.get("provenance") or {}
            fp = prov.get("store_fingerprint")
            if fp and fp not in out:
                info = StoreInfo.read(prov.get("store"), fp)
                if info:
                    out[fp] = info
        return {**self.known_stores, **out}

    def merged_with(self, earlier: CardInputs, paths: set[str]) -> CardInputs:
        """These entries, and those of an earlier publish still in the repo (``paths``:
        its files once published) and not replaced by these: the card of a repo that
        several publishes filled describes all of them."""
        mine = {k.path for k in self.kernels} | {p for p, _ in self.results} | set(self.reports)
        kernels = self.kernels + [k for k in earlier.kernels if k.path not in mine
                                  and _join(k.path, "zarr.json") in paths]
        results = self.results + [(p, d) for p, d in earlier.results if p not in mine
                                  and p in paths]
        reports = self.reports + [r for r in earlier.reports if r not in mine
                                  and _join(r, "index.html") in paths]
        used = ({k.identity.get("store_fingerprint") for k in kernels}
                | {(d.get("provenance") or {}).get("store_fingerprint") for _, d in results})
        known = {fp: st for fp, st in earlier.stores().items() if fp in used}
        for k in kernels:
            if k.store is None and k.identity.get("store_fingerprint") in known:
                k.store = known[k.identity["store_fingerprint"]]
        return CardInputs(self.repo_id, self.branch, self.license,
                          sorted(kernels, key=lambda k: k.path), sorted(results),
                          sorted(reports), self.contents, {**known, **self.known_stores})

    def as_json(self) -> dict:
        """What :meth:`from_json` reads back: the card's facts, every source file."""
        return {"schema": PROVENANCE_SCHEMA,
                "kernels": {k.path: {"identity": k.identity, "fingerprint": k.fingerprint,
                                     "device": k.device} for k in self.kernels},
                "results": {p: {k: v for k, v in d.items() if k != "per_run_accuracy"}
                            for p, d in self.results},
                "reports": self.reports,
                "stores": {fp: {"runs": s.runs, "shape": s.shape, "sources": s.sources,
                                "files": s.files} for fp, s in sorted(self.stores().items())},
                "published_with": {"kernelscale": __version__, "torch": _torch()}}

    @classmethod
    def from_json(cls, doc: dict) -> CardInputs | None:
        """The facts an earlier publish recorded (None: not kernelscale's file)."""
        if not isinstance(doc, dict) or doc.get("schema") != PROVENANCE_SCHEMA:
            return None
        stores = {fp: StoreInfo(fp, int(s["runs"]), dict(s["shape"]), list(s["sources"]),
                                list(s["files"])) for fp, s in doc.get("stores", {}).items()}
        kernels = [KernelInfo(p, dict(k["identity"]), k["fingerprint"], k.get("device"),
                              stores.get(k["identity"].get("store_fingerprint")))
                   for p, k in doc.get("kernels", {}).items()]
        return cls(kernels=kernels, results=sorted(doc.get("results", {}).items()),
                   reports=list(doc.get("reports", [])), known_stores=stores)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def size_category(n: int) -> str:
    for bound, name in SIZES:
        if n <= bound:
            return name
    return "n>1B"


def _rows(inp: CardInputs) -> int | None:
    shapes = [k.identity.get("shape") for k in inp.kernels]
    shapes += [(d.get("provenance") or {}).get("kernel_identity", {}).get("shape")
               for _, d in inp.results]
    rows = [int(s[0]) for s in shapes if s]
    return max(rows) if rows else None


def _torch() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _metadata(inp: CardInputs) -> list[str]:
    """YAML front matter; every value written as JSON, which YAML reads as is."""
    lines = ["---", f"license: {json.dumps(inp.license)}",
             f"pretty_name: {json.dumps(inp.repo_id.split('/')[-1])}", "tags:"]
    lines += [f"- {json.dumps(t)}" for t in TAGS]
    rows = _rows(inp)
    if rows is not None:
        lines += ["size_categories:", f"- {json.dumps(size_category(rows))}"]
    return lines + ["---"]


def _kernel_kind(ident: dict) -> str:
    shape = ident.get("shape") or ["?", "?"]
    a, b = (ident.get("pairs") or "test-train").split("-")
    what = (f"top-{ident['topk']} kernel ({shape[0]} {a} rows x {ident['topk']} nearest "
            f"{b} columns{', own column excluded' if ident.get('exclude_self') else ''})"
            if ident.get("topk") else f"full kernel ({shape[0]} {a} x {shape[1]} {b}, float32)")
    return f"{what}, {ident.get('runs')} runs"


def _contents(inp: CardInputs) -> list[str]:
    kinds = {k.path: _kernel_kind(k.identity) for k in inp.kernels}
    kinds.update({r: "HTML report (`index.html`, figures, `report.json`)" for r in inp.reports})
    kinds.update({p: "k-NN evaluation (accuracies, setting, provenance)" for p, _ in inp.results})
    out = ["## Contents", "", "| path | what | files | size |", "| --- | --- | --- | --- |"]
    for top, (n, size) in inp.contents.items():
        inside = sorted(p for p in kinds if p == top.rstrip("/") or p.startswith(top))
        what = "; ".join(f"`{p}`: {kinds[p]}" if p != top.rstrip("/") else kinds[p]
                         for p in inside) or ""
        out.append(f"| `{top}` | {what} | {n} | {format_bytes(size)} |")
    return out + [""]


def _accuracy(path: str, doc: dict) -> list[str]:
    def pct(x) -> str:
        return "" if x is None else f"{float(x):.2f}"

    setting = (doc.get("setting") or {}).get("label") or f"k={doc.get('k')}, majority vote"
    rows = [("average single model", doc.get("single_model_accuracy"), ""),
            (f"ensemble ({doc.get('runs')} runs)", doc.get("ensemble_accuracy"), ""),
            (f"kernel k-NN (k={doc.get('k')}, majority vote)", doc.get("knn_accuracy"), "")]
    if (doc.get("setting") or {}).get("weighting", "none") != "none":
        rows.append(("weighted kernel k-NN", doc.get("weighted_accuracy"), setting))
    for key, name in (("selection", "selected"), ("crossfit", "selected")):
        sel = doc.get(key)
        if sel:
            how = sel.get("method", "cross-fit")
            rows.append((f"{name} k-NN ({how})", sel.get("accuracy"), sel.get("description", "")))
    if doc.get("oracle"):
        o = doc["oracle"]
        rows.append(("oracle k-NN (chosen with the test labels: optimistic)", o.get("accuracy"),
                     (o.get("setting") or {}).get("label", "")))
    out = [f"### `{path}`", "", "| | accuracy (%) | setting |", "| --- | ---: | --- |"]
    out += [f"| {name} | {pct(acc)} | {note} |" for name, acc, note in rows]
    prov = doc.get("provenance") or {}
    if prov:
        out += ["", f"Computed with kernelscale {prov.get('kernelscale_version')}, torch "
                f"{prov.get('torch_version')}, numpy {prov.get('numpy_version')} on "
                f"{prov.get('device') or 'an unrecorded device'}; command "
                f"`{prov.get('command')}`."]
    return out + [""]


def _source(s: dict) -> str:
    if s.get("kind") == "hub":
        where = f"`hf://{s.get('repo')}`" + (f" folder `{s['path']}`" if s.get("path") else "")
        return (f"{where} at commit `{s.get('commit')}` (revision `{s.get('revision')}`), "
                f"files `{s.get('glob')}`")
    return f"a local folder (`{s.get('folder', '?')}`)"


def _provenance(inp: CardInputs) -> list[str]:
    out = ["## Provenance", ""]
    stores = inp.stores()
    for k in inp.kernels:
        i = k.identity
        out += [f"### `{k.path}`", "",
                f"- {_kernel_kind(i)}; kernel fingerprint `{k.fingerprint}`",
                f"- precision `{i.get('precision')}`, "
                + (f"log-softmax (`{i.get('transform')}`)" if i.get("log_softmax", True)
                   else "raw logits (no log-softmax)")
                + f", classes {i.get('classes') or 'all'}, "
                f"computed on {k.device or 'an unrecorded device'}",
                f"- store fingerprint `{i.get('store_fingerprint')}`"
                + ("" if k.store else " (the store was not at hand when publishing: its "
                   "source files are not listed)"), ""]
    for fp, st in sorted(stores.items()):
        total = len(st.files)
        out += [f"### Source of store `{fp[:16]}...`", "",
                f"{st.runs} runs from {total} file(s) of {st.shape.get('n_test')} test x "
                f"{st.shape.get('n_train')} train x {st.shape.get('classes')} classes "
                f"({st.shape.get('dtype')} logits), ingested from "
                + "; ".join(_source(s) for s in st.sources) + ".", "",
                "| file | runs | size | sha256 |", "| --- | ---: | ---: | --- |"]
        out += [f"| `{f['name']}` | {f.get('runs')} | {f.get('size')} | `{f.get('sha256')}` |"
                for f in st.files[:CARD_FILES]]
        if total > CARD_FILES:
            out.append(f"| ... {total - CARD_FILES} more: every file is in "
                       "`kernelscale-provenance.json` | | | |")
        out.append("")
    out += [f"Published with kernelscale {__version__} (torch {_torch()}).", ""]
    return out


def _loading(inp: CardInputs) -> list[str]:
    if not inp.kernels:
        return []
    k = inp.kernels[0]
    rev = "" if inp.branch == "main" else f"@{inp.branch}"
    spec = f"hf://datasets/{inp.repo_id}{rev}" + (f"/{k.path}" if k.path else "")
    rev_arg = "" if inp.branch == "main" else f', revision="{inp.branch}"'
    pattern = f"{k.path}/*" if k.path else "*"
    folder = f'f"{{root}}/{k.path}"' if k.path else "root"
    topk = bool(k.identity.get("topk"))
    read = ('nb = view.neighbours()  # values float32, index int64: (rows, K), largest first'
            if topk else "K = view.numpy()  # float32 (rows, cols)")
    arrays = ('g["values"][:], g["indices"][:]  # each row\'s K largest values, their columns'
              if topk else 'g["kernel"][:]  # float32 (rows, cols)')
    dims = "(rows, neighbour)" if topk else "named by the pairs, e.g. (test, train)"
    return ["## Loading a kernel", "",
            "With kernelscale (downloads into the Hub cache and checks every chunk's "
            "checksum first):", "", "```python", "import kernelscale", "",
            f'view = kernelscale.open_kernel("{spec}")', read, "```", "",
            f"or `kernelscale evaluate --store STORE --kernel {spec} --labels LABELS`, "
            "where STORE is the store of the same runs.", "",
            "With zarr (a Zarr v3 group; the kernel's identity is in its attributes):", "",
            "```python", "import zarr", "from huggingface_hub import snapshot_download", "",
            f'root = snapshot_download("{inp.repo_id}", repo_type="dataset", '
            f'allow_patterns=["{pattern}"]{rev_arg})',
            f'g = zarr.open_group({folder}, mode="r")', f"arrays = {arrays}",
            'identity = g.attrs["identity"]', "```", "",
            f"With xarray (dimensions {dims}):", "", "```python", "import xarray as xr", "",
            f"ds = xr.open_zarr({folder}, consolidated=False)", "```", ""]


def dataset_card(inp: CardInputs) -> str:
    """The card's text: YAML metadata, contents, accuracies, provenance, loading."""
    title = [f"# {inp.repo_id}", "", CARD_MARKER, "",
             "Ensemble-correlation kernels computed with kernelscale from the logits of an "
             "ensemble of trained networks: entry (i, j) is the correlation of examples i and "
             "j across the runs, averaged over classes; its rows' largest entries are "
             "each example's nearest neighbours for a k-NN classifier.", ""]
    body = title + _contents(inp)
    if inp.results:
        body += ["## Accuracy", ""]
        for path, doc in inp.results:
            body += _accuracy(path, doc)
    body += _provenance(inp) + _loading(inp)
    return "\n".join(_metadata(inp) + body).rstrip() + "\n"


def provenance_json(inp: CardInputs) -> str:
    """Every kernel's identity, results, reports and every store's sources and files, as
    JSON (``kernelscale-provenance.json``; a later publish merges its own into it)."""
    return json.dumps(inp.as_json(), indent=1, sort_keys=True) + "\n"
