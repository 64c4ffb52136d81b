"""Provenance of a result: which store, kernel and labels, which software, which device,
which command, when. Written into results.json, curve.json and report.json."""

from __future__ import annotations

import importlib.metadata
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .labels import Labels, is_labels_spec
from .output import KernelOutput
from .store import Store
from .version import __version__


@dataclass
class Provenance:
    """Where a result came from: the store (path, fingerprint), the kernel (path,
    fingerprint of its identity, identity; None for a curve, whose kernels are its
    points'), the labels (a file's absolute path, or a ``cifar10:`` spec), the versions,
    the device the kernel was computed on (from its done-markers), the command line and
    the UTC time the result was made."""

    store: str
    store_fingerprint: str
    labels: str
    kernelscale_version: str
    numpy_version: str
    torch_version: str | None
    kernel: str | None = None
    kernel_fingerprint: str | None = None
    kernel_identity: dict | None = None
    device: str | None = None
    command: str | None = None
    created_at: str = ""

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Provenance:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def command_line(argv: Sequence[str] | None = None) -> str | None:
    """The command that is running, shell-quoted: ``kernelscale evaluate --store ...``
    when run as ``python -m kernelscale`` or the ``kernelscale`` script; None if unknown."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return None
    exe = Path(argv[0])
    prog = "kernelscale" if (exe.name == "__main__.py" and exe.parent.name == "kernelscale"
                             ) else exe.name
    return shlex.join([prog, *argv[1:]])


def kernel_devices(kern: KernelOutput) -> str | None:
    """The device types (``cuda``, ``cpu``) the kernel's done-markers record, joined by
    commas; None when none records one."""
    return ",".join(sorted({str(d["device"]) for d in kern.markers()
                            if d.get("device")})) or None


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - torch is required
        return None


def _labels_source(spec: str) -> str:
    return spec if is_labels_spec(spec) or spec.startswith("<") else str(Path(spec).resolve())


def make_provenance(store: Store, labels: Labels | str, kernel: KernelOutput | None = None,
                    *, device: str | None = None, command: str | None = None) -> Provenance:
    """The provenance of a result computed from ``store``, ``labels`` and ``kernel``.

    ``device``: default, the devices of ``kernel``'s done-markers; ``command``: default,
    :func:`command_line`.
    """
    if device is None and kernel is not None:
        device = kernel_devices(kernel)
    return Provenance(
        store=str(Path(store.root).resolve()), store_fingerprint=store.fingerprint(),
        labels=_labels_source(labels if isinstance(labels, str) else labels.source),
        kernelscale_version=__version__, numpy_version=np.__version__,
        torch_version=_torch_version(),
        kernel=str(Path(kernel.path).resolve()) if kernel is not None else None,
        kernel_fingerprint=kernel.fingerprint() if kernel is not None else None,
        kernel_identity=dict(kernel.attrs["identity"]) if kernel is not None else None,
        device=device, command=command if command is not None else command_line(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
