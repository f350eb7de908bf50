"""Shared by the bench scripts: bytes in use on glibc's heap, for CPU peak-memory figures.

torch's CPU allocator takes its memory from malloc, so the heap in use (``mallinfo2``: small
blocks plus mmapped blocks) sees every tensor; the RSS would not (freed blocks stay mapped once
glibc's mmap threshold has grown).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap_probe() -> Callable[[], int] | None:
    """A function returning the bytes in use on glibc's heap, or None where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError, TypeError):
        return None

    def probe() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)

    return probe
