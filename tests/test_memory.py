"""istr.engine.memory: after keep_freed_memory, large tensors come from glibc's heap, not from fresh mappings."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from istr.engine.memory import keep_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mapped_bytes() -> int:
    """glibc's count of bytes in blocks served by their own mmap (unmapped again on free)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    return mallinfo2().hblkhd


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_tensors_come_from_the_heap():
    """64 MB is over glibc's largest mmap threshold (32 MB): by default such a tensor is its own mapping
    (not asserted here: the bench tests may have set the process up already)."""
    nbytes = 64 << 20
    assert keep_freed_memory()
    before = _mapped_bytes()
    kept = torch.empty(nbytes // 4)
    assert _mapped_bytes() - before < nbytes and kept.numel() == nbytes // 4
