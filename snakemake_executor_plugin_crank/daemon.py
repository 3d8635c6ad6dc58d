"""Work on a daemon thread of its own, for what crank must be able to stop waiting for (a
registry's pull, a store's request): a process that exits never waits for such a thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable


def in_background(work: Callable[..., Any], *args: Any, name: str = "crank-daemon") -> Future:
    """``work(*args)`` on a daemon thread; its result, or what it raised, in the future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks the future
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
