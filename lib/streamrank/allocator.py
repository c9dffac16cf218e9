"""glibc malloc settings for the worker processes that score with the model on CPU.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh
pages from the kernel and unmaps them on free, so each such tensor costs one page fault
per 4 KiB page on first touch, every batch. A scoring batch of 2,048 viewers allocates
feed-forward activations of up to 52 MiB ([2048, 50, 256] bf16). Keeping freed memory in
malloc's heap made one process score 80,000 viewers in 13.7 s instead of 15.7 s (median
of 3, two rounds; docs/performance.md). PyTorch's CPU performance guide suggests jemalloc or tcmalloc
for the same reason; two `mallopt` calls need neither.

The price is that a process keeps its peak heap until it exits, which suits the
short-lived or reused worker processes that call this, not a long-lived host process
(the MLflow pyfunc, loaded into whatever serves it, leaves malloc alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: Free memory at the top of the heap that malloc keeps instead of returning it (bytes).
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Serve large blocks from malloc's heap and keep freed memory for reuse (once per process).

    Returns whether the settings are in effect: False where the C library is not glibc
    (macOS, musl), where the call is skipped and nothing changes.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no mmap for large blocks: they come from the heap, where freed memory is reused
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _applied:
        log.debug("mallopt refused the settings; malloc keeps its defaults")
    return _applied
