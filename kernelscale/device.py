"""The compute device of the kernel engine: choice, memory budget, matmul precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import ConfigError


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def default_budget(device) -> int:
    """Device bytes for tiles: 80% of a GPU's total memory; 1/4 of RAM on the CPU.

    Total (not free) memory keeps the plan, and so the checkpoints, the same across
    re-runs of one command on one machine type.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    import torch

    old_p = torch.get_float32_matmul_precision()
    old_tf = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    try:
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield
    finally:
        torch.set_float32_matmul_precision(old_p)
        torch.backends.cuda.matmul.allow_tf32 = old_tf
        torch.backends.cudnn.allow_tf32 = old_cudnn
