"""What a kernel request is and what it means for its store: the configuration, its
validation against the store (runs, classes, output shape, region), the identity a
partial output must match, and the output group it writes to."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, StoreError
from .output import DEFAULT_CHUNKS, PAIRS, KernelOutput
from .plan import Tile
from .stats import FLOAT64, value_transform
from .store import Store

PRECISIONS = ("fp32", "tf32")


@dataclass
class KernelConfig:
    """Everything one kernel computation needs; validated by :meth:`validate`."""

    store: Path
    out: Path
    runs: int | None = None
    pairs: str = "test-train"
    device: str = "auto"
    precision: str = "fp32"
    max_memory: int | None = None
    tile: tuple[int, int] | None = None
    chunks: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    checkpoint_every: float = 600.0
    log_softmax: bool = True
    #: evaluate the log-softmax in float32 as the published code does (reproduces its
    #: numbers; see :mod:`kernelscale.kernel` for the error this costs)
    log_softmax_fp32: bool = False
    classes: tuple[int, ...] | None = None
    overwrite: bool = False
    restart: bool = False
    show_progress: bool = True
    runs_per_step: int | None = None  #: runs folded per GEMM step (default: planned)
    #: keep each row's K largest values (a top-K kernel) instead of the full matrix
    topk: int | None = None

    def validate(self) -> None:
        if self.pairs not in PAIRS:
            raise ConfigError(f"--pairs must be one of {', '.join(PAIRS)}, not {self.pairs!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not "
                              f"{self.precision!r} (bf16 changes ~11% of top-3 neighbour "
                              "sets and is not offered)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.runs is not None and self.runs < 2:
            raise ConfigError(f"--runs {self.runs}: the kernel needs at least 2 runs")
        if self.checkpoint_every <= 0:
            raise ConfigError("--checkpoint-every must be positive")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError("--max-memory must be positive")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk {self.topk}: must be at least 1")


def _check_range(rng: tuple[int, int] | None, n: int, what: str) -> tuple[int, int]:
    if rng is None:
        return (0, n)
    a, b = rng
    if not 0 <= a < b <= n:
        raise ConfigError(f"--{what} {a}:{b} is outside 0:{n}")
    return (a, b)


@dataclass
class KernelSetup:
    """What a :class:`KernelConfig` means for a given store (no computation yet)."""

    store: Store
    runs: int
    classes: list[int] | None
    shape: tuple[int, int]  #: the whole kernel's (rows, cols)
    region: Tile  #: the part of it to compute
    identity: dict
    transform: str  #: the value transform (:mod:`kernelscale.stats`)

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.store.shape.classes


def setup_kernel(cfg: KernelConfig) -> KernelSetup:
    """Validate ``cfg`` against its store: runs, classes, output shape, region, identity.

    The identity (store fingerprint, runs, pairs, precision, transform, classes, shape)
    is what a partial output, a checkpoint or a done-marker must match to be reused.
    """
    cfg.validate()
    store = Store.open(cfg.store, mode="r")
    if store.runs < 2:
        raise StoreError(f"{cfg.store}: holds {store.runs} run(s); the kernel needs >= 2")
    runs = cfg.runs if cfg.runs is not None else store.runs
    if runs > store.runs:
        raise ConfigError(f"--runs {runs} is larger than the {store.runs} runs "
                          f"{cfg.store} holds")
    C = store.shape.classes
    classes = sorted(set(cfg.classes)) if cfg.classes is not None else None
    if classes is not None and (not classes or classes[0] < 0 or classes[-1] >= C):
        raise ConfigError(f"--class must lie in [0, {C})")
    rsplit, csplit = PAIRS[cfg.pairs]
    shape = (store.shape.examples(rsplit), store.shape.examples(csplit))
    region = Tile(*_check_range(cfg.rows, shape[0], "rows"),
                  *_check_range(cfg.cols, shape[1], "cols"))
    identity = {"store_fingerprint": store.fingerprint(), "runs": runs,
                "pairs": cfg.pairs, "precision": cfg.precision,
                "log_softmax": cfg.log_softmax, "log_softmax_fp32": cfg.log_softmax_fp32,
                "classes": classes, "shape": list(shape)}
    transform = value_transform(store.transform, cfg.log_softmax, cfg.log_softmax_fp32)
    if cfg.log_softmax and not cfg.log_softmax_fp32 and transform != FLOAT64:
        # kernels of stores from before the float32 log1p transform keep their identity
        identity["transform"] = transform
    if cfg.topk is not None:
        square = rsplit == csplit
        if cfg.topk > shape[1] - square:
            raise ConfigError(f"--topk {cfg.topk}: the kernel has {shape[1]} columns"
                              + (" and a row's own column is excluded" if square else ""))
        # a square top-K kernel never lists a row's own column
        identity.update(topk=cfg.topk, exclude_self=square)
    return KernelSetup(store, runs, classes, shape, region, identity, transform)


def output_chunks(cfg: KernelConfig, shape: tuple[int, int]) -> tuple[int, int]:
    """The chunks the output has or will have: its own when it exists (and is kept)."""
    if cfg.chunks is not None:
        return tuple(cfg.chunks)
    with contextlib.suppress(Exception):
        return KernelOutput.open(cfg.out).chunks
    return (min(shape[0], DEFAULT_CHUNKS[0]), min(shape[1], DEFAULT_CHUNKS[1]))


def create_output(cfg: KernelConfig, res: KernelSetup | None = None) -> KernelOutput:
    """Create (or check and reopen) the output group of ``cfg`` without computing.

    Run once before many processes compute regions of the same kernel (a Slurm array),
    so that none of them races to create it.
    """
    res = res or setup_kernel(cfg)
    out = KernelOutput.open_or_create(Path(cfg.out), res.identity, res.shape, cfg.chunks,
                                      overwrite=cfg.overwrite, restart=cfg.restart,
                                      store=str(cfg.store))
    want = {"store": str(Path(cfg.store).resolve()), "runs": res.runs,
            "precision": cfg.precision, "pairs": cfg.pairs}
    attrs = out.attrs
    # Only write what differs: concurrent region tasks must not rewrite zarr.json (and
    # so race with the task that marks the kernel complete) for nothing.
    if any(attrs.get(k) != v for k, v in want.items()):
        out.group.attrs.update(want)
    return out
