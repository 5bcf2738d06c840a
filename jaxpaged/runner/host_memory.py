"""glibc malloc settings for the runner's per-step host arrays.

A step at 1,024 rows builds a few MB of numpy inputs (block tables, the sampling rows, the
packed buffer) and frees them a step later. glibc serves blocks that large with mmap, or
trims the freed top of its heap back to the system, so every step paid for fresh pages: on a
2-core CI box InputBatch.prepare took 2.3-3.2 ms per 1,024-row decode step, 0.35 ms once
freed memory stays with the process (docs/benchmarks.md). With mmap kept for blocks over
32 MB (glibc's most) and trimming only past 1 GiB of free heap, the same pages are reused.
Process-wide, like the GIL switch interval the runner sets; JAXPAGED_MALLOC_TUNING=0 skips it.
"""

from __future__ import annotations

import ctypes
import logging
import sys

from jaxpaged import envs

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_host_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True if both were
    set, False where there is no glibc mallopt (macOS, musl) or it is turned off."""
    if not envs.malloc_tuning() or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        logger.debug("mallopt refused the thresholds; host arrays use fresh pages each step")
    return done
