"""What keeps the memory of uploads bounded: a budget of part buffers shared by all upload
threads, and glibc told to give large buffers back to the system when freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_heap_limited = False


def limit_heap_growth() -> None:
    """Serve large buffers (the upload parts) with mmap, so each one goes back to the system
    when freed. By default glibc raises its mmap threshold to the size of the largest block
    freed, after which 8 MiB parts come from the per-thread heaps and stay there: measured
    +516 MB peak RSS while staging 5 GiB with 8 workers, +80 MB with the threshold fixed."""
    global _heap_limited
    if _heap_limited:
        return
    _heap_limited = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


class MemoryBudget:
    """Counting semaphore over upload buffers; an upload takes all the parts it needs at once."""

    def __init__(self, parts: int):
        self._free = parts
        self._cond = threading.Condition()

    @contextmanager
    def take(self, parts: int):
        with self._cond:
            self._cond.wait_for(lambda: self._free >= parts)
            self._free -= parts
        try:
            yield
        finally:
            with self._cond:
                self._free += parts
                self._cond.notify_all()
