"""Following a run's tasks: one tagged ListTasks (view MINIMAL) per status round for all the
watched tasks, however many there are."""

from __future__ import annotations

import threading
import time
from typing import Dict

from .api import TesApi

# how long a created task may be missing from ListTasks / GetTask (404) before it is LOST
APPEAR_GRACE_S = 60.0


class Monitor:
    """The watched task ids and when each was created; thread-safe (tasks are created in a
    pool while the status rounds run on Snakemake's loop)."""

    def __init__(self, api: TesApi, tag_key: str, tag_value: str):
        self.api = api
        self.tag = (tag_key, tag_value)
        self._lock = threading.Lock()
        self._created: Dict[str, float] = {}  # task id -> when it was created (monotonic)

    def add(self, task_id: str) -> None:
        with self._lock:
            self._created[task_id] = time.monotonic()

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._created.pop(task_id, None)

    def round(self) -> Dict[str, str]:
        """The TES state of every watched task the server lists, in one request (none when
        nothing is watched); raises what the request raises."""
        with self._lock:
            if not self._created:
                return {}
        tasks = self.api.list_tasks(*self.tag, bounded=True)
        with self._lock:
            return {t.id: t.state or "UNKNOWN" for t in tasks if t.id in self._created}

    def young(self, task_id: str) -> bool:
        """Created so recently that the server may not show it yet."""
        with self._lock:
            created = self._created.get(task_id)
        return created is not None and time.monotonic() - created < APPEAR_GRACE_S
