"""Every environment variable jaxpaged reads, in one place."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where the default model and the compilation cache live (JAXPAGED_CACHE_DIR)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "jaxpaged")
    return os.environ.get("JAXPAGED_CACHE_DIR", default)


def compilation_cache_dir() -> str | None:
    """Persistent XLA compilation cache (JAXPAGED_COMPILATION_CACHE; '0' disables it)."""
    value = os.environ.get("JAXPAGED_COMPILATION_CACHE")
    if value == "0":
        return None
    return value or os.path.join(cache_dir(), "xla")


def xla_mem_fraction() -> float:
    """Fraction of GPU memory JAX's allocator may use (XLA_CLIENT_MEM_FRACTION, or its old
    name XLA_PYTHON_CLIENT_MEM_FRACTION; 0.75 by default). With preallocation off the BFC
    allocator keeps the same limit (JAX's GPU memory documentation), so it counts too."""
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if os.environ.get(name):
            return float(os.environ[name])
    return 0.75


def malloc_tuning() -> bool:
    """Whether the runner sets glibc's malloc thresholds (JAXPAGED_MALLOC_TUNING; '0' turns
    it off): runner/host_memory.py."""
    return os.environ.get("JAXPAGED_MALLOC_TUNING") != "0"


def gc_freeze() -> bool:
    """Whether LLM() freezes its start-up heap out of the garbage collector's full passes
    (JAXPAGED_GC_FREEZE; '0' turns it off, as the tests do: they build many engines)."""
    return os.environ.get("JAXPAGED_GC_FREEZE") != "0"
