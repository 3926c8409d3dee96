"""Keep the heap's pages: big buffers are reused, not mapped and faulted in again.

A relay reads into new blocks -- a `bytes` of up to 256 KiB per read, or a 1 MiB
`ReadBuffer` scratch when the last one is still held -- and drops them a moment later,
when the bytes were written on. glibc serves blocks that large with `mmap` (or trims
the heap below them when they are freed), so every read of a busy flow paid for
64 fresh pages: page faults, zeroing, unmapping. Measured in the connector of
`bench/relay.py`, that was about a sixth of the process's time and a third of its CPU
per GB. Raising glibc's mmap and trim thresholds keeps such blocks in the heap, where
the next read finds them: memory already held is reused instead of returned.

Only for long-running daemons (`tether` commands), only with glibc; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_heap_pages"]

log = logging.getLogger("tether")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_heap_pages(mmap_threshold: int = 4 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Serve blocks below `mmap_threshold` from the heap and keep up to
    `trim_threshold` free bytes at its top. Returns False where that is not possible
    (no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not done:
        log.debug("mallopt refused the heap thresholds")
    return done
