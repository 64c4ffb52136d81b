"""The package's layers: every import (also those inside functions) points down or
sideways within a layer, no module imports the command line, and there is no cycle.

Every module must be placed in :data:`LAYERS`: a new module fails this test until it is.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "kernelscale"

#: bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("foundations", {"errors", "atomic", "progress", "units", "signals", "device", "version",
                     "bundled", "crc32c", "crc32c_kernel", "cpufeatures"}),
    ("pure logic", {"fused", "fused_kernels", "fused_gpu", "fused_gpu_kernels", "float64_rows", "stats", "plan",
                    "topk", "knn", "normalise", "similarity"}),
    ("formats", {"rawchunks", "store", "store_layout", "store_chunks", "store_stats",
                 "store_labelfile", "store_info", "locks", "output", "kernelread", "labels", "logfile",
                 "formats", "formats.common", "formats.sniff", "formats.safetensors_io",
                 "formats.numpy_io", "formats.zarr_io", "formats.torchzip", "formats.torchmap",
                 "formats.headers"}),
    ("sources", {"sources", "sources.base", "sources.local", "sources.hubspec",
                 "sources.hubfail", "sources.hub", "sources.pairs", "sources.zarrgroup",
                 "sources.ranged"}),
    ("stages", {"convert", "parallel", "ingestion", "ingestcheck", "ingestplan", "listing", "runcount",
                "reader", "accumulate", "kernel", "kernel_setup", "kernel_plan", "kernel_passes",
                "evaluation", "curve", "neighbours", "compare",
                "interpret", "figures", "report", "report_data", "report_html",
                "report_sections", "report_context", "report_views", "simulation", "bench", "bench_ingest",
                "integrity", "arrays", "provenance", "card", "publishfiles", "publishmanifest", "publish", "hubkernel"}),
    ("orchestration", {"jobfields", "jobtables", "config", "share", "pipeline", "api",
                       "slurm", "slurm.geometry",
                       "slurm.scripts", "slurm.queue", "slurm.commands"}),
    ("command line", {"cli", "cli_parser", "cli_commands", "__main__"}),
]
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(path: Path) -> list[str]:
    """The package a module's relative imports start from, as name parts."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return parts[:-1]


def imports_of(path: Path) -> set[str]:
    """kernelscale modules (names relative to the package) that ``path`` imports; "" is
    the package itself."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    base = package_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "kernelscale" or a.name.startswith("kernelscale."):
                    out.add(a.name.removeprefix("kernelscale").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "kernelscale"
                                    or node.module.startswith("kernelscale.")):
                    target = node.module.removeprefix("kernelscale").lstrip(".")
                else:
                    continue
            else:
                up = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*up, *(node.module.split(".") if node.module else [])])
            # `from . import X` / `from .pkg import X` may name submodules
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                if (PKG / (sub.replace(".", "/") + ".py")).exists() or \
                        (PKG / sub.replace(".", "/") / "__init__.py").exists():
                    out.add(sub)
                else:
                    out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    g = graph()
    unplaced = sorted(m for m in g if m and m not in LEVEL)
    assert not unplaced, f"modules without a layer in tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    g = graph()
    upward = []
    for mod, targets in g.items():
        if not mod:
            continue  # the package's face re-exports the API lazily
        for t in targets:
            if t == "":
                upward.append(f"{mod} imports the package kernelscale itself")
            elif t in LEVEL and LEVEL[t] > LEVEL[mod]:
                upward.append(f"{mod} ({LAYERS[LEVEL[mod]][0]}) imports {t} "
                              f"({LAYERS[LEVEL[t]][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_nothing_imports_the_command_line():
    g = graph()
    users = sorted(m for m, ts in g.items() if "cli" in ts and m != "__main__")
    assert not users


def test_no_import_cycle():
    g = {m: {t for t in ts if t in LEVEL} for m, ts in graph().items() if m}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rules above catch what they claim to: a formats module importing a stage."""
    fake = tmp_path / "kernelscale"
    (fake / "sources").mkdir(parents=True)
    (fake / "store.py").write_text("from .kernel import compute_kernel\n")
    (fake / "kernel.py").write_text("def f():\n    from .store import Store\n")
    (fake / "sources" / "__init__.py").write_text("from .. import store\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert imports_of(fake / "store.py") == {"kernel"}
    assert imports_of(fake / "kernel.py") == {"store"}
    assert imports_of(fake / "sources" / "__init__.py") == {"store"}
    with pytest.raises(AssertionError, match=r"store \(formats\) imports kernel \(stages\)"):
        test_imports_point_down()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
