"""The compute device of the kernel engine: choice, memory budget, matmul precision,
what identifies it, and which failures mean "out of memory"."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

from .errors import ConfigError

#: ``torch.backends.cuda.matmul.fp32_precision`` for each kernel precision
_FP32_PRECISION = {"fp32": "ieee", "tf32": "tf32"}


def resolve_device(name: str):
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a ``torch.device``; a CUDA device always
    carries its index (``cuda`` is the current device), so that every event, stream,
    synchronisation and cache call can name it."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    dev = torch.device(name)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this node has {torch.cuda.device_count()} CUDA "
                          f"device(s), 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


#: device nodes of the drivers through which torch sees a GPU (NVIDIA's, also its loaded
#: kernel module where nodes are made on first use; AMD ROCm's; WSL's GPU
#: paravirtualisation): a Linux node with none of them has no GPU torch could use
GPU_NODES = ("/dev/nvidia*", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def _may_have_gpu() -> bool:
    import glob

    return not sys.platform.startswith("linux") or any(glob.glob(p) for p in GPU_NODES)


def device_name(name: str) -> str:
    """What the device ``name`` (``auto``/``cpu``/``cuda``/``cuda:N``) resolves to, as text
    (``cpu``, ``cuda:0``), for stages that need torch only on a GPU: ``cpu``, and
    ``auto`` on a Linux node without any :data:`GPU_NODES`, are ``cpu`` without importing
    torch (~1.5 s of a process on 2 cores); the rest is :func:`resolve_device`."""
    if name == "cpu" or (name == "auto" and not _may_have_gpu()):
        return "cpu"
    return str(resolve_device(name))


def default_budget(device) -> int:
    """Device bytes for tiles: 80% of a GPU's total memory; 1/4 of RAM on the CPU.

    Total (not free) memory keeps the plan, and so the checkpoints, the same across
    re-runs of one command on one machine type.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


def _libc():
    """glibc, or None where the C library is another (its allocator is left alone)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Buffers of a few MB freed by one thread stay resident in its allocator
    arena otherwise, and a loop that allocates them afresh each round grows the
    process's resident memory round by round."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def limit_heap_arenas(arenas: int = 2) -> None:
    """Let the C heap keep at most ``arenas`` arenas (glibc's ``M_ARENA_MAX``; default 8
    per core). Each reader and compute thread otherwise gets its own, each holding freed
    buffers of its own: a top-K kernel of 25 passes (1,000 x 100,000) peaked at 785 MiB
    against 695 MiB for one pass, and at 721 MiB with 2 arenas, in the same time."""
    lib = _libc()
    if lib is not None:
        lib.mallopt(_M_ARENA_MAX, arenas)


def check_precision_environment(precision: str, environ=os.environ) -> None:
    """Refuse or warn about environment variables that change what ``precision`` means.

    ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` makes cuBLAS use TF32 whatever PyTorch asks
    for, so an ``fp32`` kernel would silently be a TF32 one (errors ~1e-4 instead of
    ~1e-7): refused. ``NVIDIA_TF32_OVERRIDE=0`` makes the driver ignore TF32 requests, so
    a ``tf32`` kernel runs at fp32 speed: correct, but not what was asked; warned.
    """
    if precision == "fp32" and environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in (
            "", "0"):
        raise ConfigError("--precision fp32: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="
                          f"{environ['TORCH_ALLOW_TF32_CUBLAS_OVERRIDE']} in the environment "
                          "forces TF32 matrix products; unset it, or pass --precision tf32")
    if precision == "tf32" and environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        warnings.warn("--precision tf32: NVIDIA_TF32_OVERRIDE=0 in the environment disables "
                      "TF32; the kernel is computed in full fp32 (same result within "
                      "tolerance, slower)", stacklevel=2)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Matrix products in ``precision`` (``fp32`` or ``tf32``) inside the block.

    Uses only the ``fp32_precision`` API where torch has it: reading the legacy
    ``allow_tf32`` flag raises once anything in the process used the new API. The old
    value is restored on exit. Only CUDA matmuls have a TF32 mode; the CPU is unaffected.
    """
    import torch

    check_precision_environment(precision)
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = _FP32_PRECISION[precision]
        try:
            yield
        finally:
            m.fp32_precision = old
        return
    old_tf = m.allow_tf32  # torch < 2.9: only the legacy flag exists
    m.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        m.allow_tf32 = old_tf


def device_info(device) -> dict:
    """What a checkpoint records of the device, and what resuming compares: bitwise
    equality of a resumed kernel holds only on the same device model and library
    versions (and, on the CPU, thread count)."""
    import torch

    info = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, cublas=_cublas_version())
    else:
        import platform

        info.update(name=platform.machine(), threads=torch.get_num_threads(), **blas_info())
    return info


def blas_info() -> dict:
    """numpy's BLAS, which runs the CPU kernel's GEMMs (:func:`kernelscale.accumulate.
    add_product`): ``blas`` (name and version) and ``blas_threads`` (its thread count,
    None where it cannot be asked): its products' bits depend on both."""
    import numpy as np

    dep = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return {"blas": f"{dep.get('name')} {dep.get('version')}", "blas_threads": _blas_threads()}


def _blas_threads() -> int | None:
    """OpenBLAS's own thread count, asked of the library numpy loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = {ln.split()[-1] for ln in fh if "/" in ln}
        libs = sorted(p for p in paths if "openblas" in p.lower() and ".so" in p)
    except OSError:
        return None
    for path in libs:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                        "openblas_get_num_threads"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    return int(fn())
    return None


def _cublas_version() -> str:
    from importlib import metadata

    for dist in ("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12",
                 "nvidia-cublas-cu11"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "unknown"


def describe_device_change(old: dict, new: dict) -> str:
    """'' when ``old`` and ``new`` (from :func:`device_info`) are the same, else which
    fields differ, e.g. ``name H100 -> A100, torch 2.11.0 -> 2.14.1``."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys
                     if old.get(k) != new.get(k))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory: torch's own error, or a cuBLAS
    failure to allocate its workspace (raised as a plain ``RuntimeError``)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in msg
                                              or "CUDA out of memory" in msg)
