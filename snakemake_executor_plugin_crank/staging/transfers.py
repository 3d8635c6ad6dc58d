"""Store requests that can be given up on: each runs on a daemon thread of its own while the
caller waits for it, so that the caller can be released at once.

A request that makes no progress for ``stall_s`` is given up on and raises Stalled (an S3
server that stops reading a PUT's body holds it otherwise: no client timeout covers a body
the server does not read). ``abandon()`` gives up on every request in flight and refuses new
ones with digest.Stopped, for a run that is ending (Ctrl-C). A request given up on is told
so through its Progress (an upload then fails at its next part) and otherwise ends in its
thread by obstore's own timeouts, its result dropped; a process that exits does not wait
for it. A PUT or multipart upload that does not end is never completed, so nothing appears
under its key.

Threads rather than obstore's async calls: an async call's completion runs on obstore's own
runtime threads, which can still be handing objects back to Python while the interpreter
shuts down (measured: an occasional SIGABRT at exit); the blocking calls return everything
on the thread that made them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait
from typing import Callable, Optional, TypeVar

from ..daemon import in_background
from ..errors import BackendUnavailable
from .digest import Stopped

T = TypeVar("T")
# how often a waiting caller looks at the clock and at abandon()
WAKE_S = 0.2


class Stalled(BackendUnavailable):
    def __init__(self) -> None:
        super().__init__("the request made no progress")


class Progress:
    """When a request last moved data (``moved()``), and whether its caller gave up on it."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.given_up = False

    def moved(self) -> None:
        if self.given_up:
            raise Stopped()
        self.last = time.monotonic()


class Transfers:
    """Thread-safe."""

    def __init__(self) -> None:
        self._abandoned = threading.Event()

    def run(self, work: Callable[[Progress], T], stall_s: Optional[float] = None) -> T:
        """``work(progress)`` on a thread of its own; its result, or what it raised. Raises
        Stalled when ``stall_s`` passed without ``progress.moved()`` and without an end, and
        Stopped once abandoned."""
        if self._abandoned.is_set():
            raise Stopped()
        progress = Progress()
        request = in_background(work, progress, name="crank-store-io")
        while not wait([request], timeout=WAKE_S).done:
            if self._abandoned.is_set() or (stall_s is not None and time.monotonic() - progress.last > stall_s):
                progress.given_up = True
                raise Stopped() if self._abandoned.is_set() else Stalled()
        return request.result()

    def abandon(self) -> None:
        """Give up on every request in flight, now and later."""
        self._abandoned.set()
