"""CPU memory setting for training and the bench: glibc keeps freed memory instead of unmapping it.

glibc's malloc serves every block over its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on free, so each large tensor of a step (ISTR's 78 MB dynamic-conv parameters per stage,
Mask R-CNN's RoI features) is zero-filled page by page by the kernel again on every step. This
counted 1-2 s of system time per R50/512 ISTR train step on the 2-core development machine (0.2-0.6 s
with this setting; busy shared core, one thread).
Applied to the whole process: CPU training sets it before the first step, and the bench before
building either model, so both benchmarked models run under it alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_BYTES = 1 << 30  # free memory at the heap's top beyond this still goes back to the OS


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep up to ``KEEP_BYTES`` of freed memory; False off glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
