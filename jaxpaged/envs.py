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
    """Fraction of GPU memory JAX's allocator reserves (XLA_PYTHON_CLIENT_MEM_FRACTION);
    with preallocation off (XLA_PYTHON_CLIENT_PREALLOCATE=false) the whole device counts."""
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
        return 1.0
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
