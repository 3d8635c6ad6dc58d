"""Live logs of a run's running TES tasks, from the tail of each executor's stdout and
stderr that the server keeps in a task's FULL view while it runs (Funnel: the last 10 kB,
updated every few seconds). Every INTERVAL_S while tasks of the run run: one tagged list
of the RUNNING tasks in the FULL view (live.py places each tail after what was shown).

Best effort: a request that fails is tried at the next interval and never fails a status
round; a server that ignores or refuses the list's filters (an older TES) is not asked, and
its tasks' logs appear when they end, as before.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

from ..live import LiveLog
from .api import TesApi

INTERVAL_S = 3.0
KIND = "tails"  # what the session counts these requests as


class Tails:
    def __init__(self, api: TesApi, tag_key: str, tag_value: str,
                 clock: Callable[[], float] = time.monotonic):
        self.api = api
        self.tag = (tag_key, tag_value)
        self.clock = clock
        self._last = None

    def round(self, running: Mapping[str, Mapping[str, LiveLog]]) -> None:
        """Append to the live logs of ``running`` (TES task id -> live logs by suffix)."""
        now = self.clock()
        if not running or self.api.filters_unreliable or (self._last is not None and now - self._last < INTERVAL_S):
            return
        self._last = now
        try:
            tasks = self.api.list_tasks(*self.tag, view="FULL", bounded=True, states=("RUNNING",), kind=KIND)
        except Exception:  # noqa: BLE001 - live logs only, never a failed round: tried at the next interval
            return
        for t in tasks:
            try:
                live = running.get(t.id)
                executors = (t.logs[-1].logs or []) if live and t.logs else []
                if not executors:
                    continue
                for suffix, text in ((".stdout", executors[-1].stdout), (".stderr", executors[-1].stderr)):
                    if text and suffix in live:
                        live[suffix].follow_tail(text.encode(errors="replace"))
            except Exception:  # noqa: BLE001 - live logs only: tried at the next interval
                continue

