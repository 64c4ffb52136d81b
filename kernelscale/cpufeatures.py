"""What the CPU that numba compiles for can do: the instructions a kernel may use."""

from __future__ import annotations


def numba_target_has(feature: str) -> bool:
    """Whether numba compiles for a CPU with the LLVM feature ``feature`` (``sse4.2``,
    ``f16c``, ...).

    numba targets the host CPU unless ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` name
    another (a portable cache): then only features listed there as ``+feature`` count,
    and a named CPU without a list counts as having none of them, since LLVM aborts the
    process on an instruction its target cannot emit. False where numba is missing."""
    try:
        import llvmlite.binding as llvm
        import numba
    except ImportError:
        return False
    if numba.config.CPU_FEATURES:
        return f"+{feature}" in str(numba.config.CPU_FEATURES).split(",")
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    try:
        return bool(llvm.get_host_cpu_features().get(feature, False))
    except RuntimeError:  # the host's features unknown: none are assumed
        return False
