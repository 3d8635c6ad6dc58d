"""Store requests that can be dropped: obstore's async calls, each on an event loop of the
store's own, so that the thread waiting for one can be released at once.

A request that makes no progress for ``stall_s`` is dropped and raises Stalled (an S3
server that stops reading a PUT's body holds it otherwise: no client timeout covers a body
the server does not read). ``abandon()`` drops every request in flight and refuses new ones
with digest.Stopped, for a run that is ending (Ctrl-C). A dropped PUT or multipart upload is
never completed, so nothing appears under its key."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Awaitable, Callable, Optional, TypeVar

from ..errors import BackendUnavailable
from .digest import Stopped

T = TypeVar("T")


class Stalled(BackendUnavailable):
    def __init__(self) -> None:
        super().__init__("the request made no progress")


class Progress:
    """When a request last moved data; ``moved()`` says it did."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def moved(self) -> None:
        self.last = time.monotonic()


class Transfers:
    """Thread-safe; its event loop's thread starts with the first request and is a daemon,
    so a process that ends never waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._running: set = set()
        self._abandoned = False

    def run(self, work: Callable[[Progress], Awaitable[T]], stall_s: Optional[float] = None) -> T:
        """``await work(progress)`` on the loop and return its result. Raises what it raises,
        Stalled when ``stall_s`` passed without ``progress.moved()`` and without an end, and
        Stopped once abandoned."""
        with self._lock:
            if self._abandoned:
                raise Stopped()
            future = asyncio.run_coroutine_threadsafe(_watched(work, stall_s), self._started())
            self._running.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Stopped() from None
        finally:
            with self._lock:
                self._running.discard(future)

    def abandon(self) -> None:
        """Drop every request in flight, now and later."""
        with self._lock:
            self._abandoned = True
            running = list(self._running)
        for future in running:
            future.cancel()

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="crank-store-io", daemon=True).start()
        return self._loop


async def _watched(work: Callable[[Progress], Awaitable[T]], stall_s: Optional[float]) -> T:
    progress = Progress()
    task = asyncio.ensure_future(work(progress))
    try:
        if stall_s is None:
            return await task
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(1.0, stall_s / 4))
            if done:
                return task.result()
            if time.monotonic() - progress.last > stall_s:
                raise Stalled()
    finally:
        task.cancel()  # abandoned or stalled: the request is dropped
