"""Following a run's tasks: a status round's requests and bytes grow with the tasks still
watched (created, not yet released), never with the tasks the run finished or with what
else the server holds.

A round either lists or asks by id. Listing: one tagged ListTasks for each state a task waits
or runs in (TES 1.1's state filter), which lists the run's active tasks only, then one GetTask
(MINIMAL) for each watched task those lists miss: it ended since the last round (asked once;
the backend releases it in the same round), is in a state not listed (PAUSED, CANCELING), or
is not visible yet. By id: one GetTask for each watched task, LOOKUP_THREADS at a time.
Both cost what the watched tasks cost; which is faster depends on the server: every filtered
list makes Funnel walk its whole task table (BoltDB, every task of every earlier run), while
a GetTask is one lookup. So a round asks by id with FEW or fewer watched tasks, and otherwise
takes whichever the latest measured request times say is faster, listing again every
REMEASURE_ROUNDS rounds to follow a table that changed. Once the server was found to refuse
or ignore the filters (``TesApi.filters_unreliable``), crank asks for each watched task by id."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Set

from .api import TesApi
from .http import HttpError

# how long a created task may be missing from ListTasks / GetTask (404) before it is LOST
APPEAR_GRACE_S = 60.0
# the states a task waits or runs in, each listed with its own request; RUNNING first, as
# most active tasks are there and a task moving on between two lists is asked by id
LISTED_STATES = ("RUNNING", "QUEUED", "INITIALIZING")
# up to this many watched tasks, a GetTask each costs the server less than the lists
FEW = 8
# GetTasks of one round in flight at once
LOOKUP_THREADS = 8
# rounds asked by id in a row before the lists are timed again
REMEASURE_ROUNDS = 20


class Monitor:
    """The watched task ids and when each was created; thread-safe (tasks are created in a
    pool while the status rounds run on Snakemake's loop)."""

    def __init__(self, api: TesApi, tag_key: str, tag_value: str,
                 clock: Callable[[], float] = time.monotonic):
        self.api = api
        self.tag = (tag_key, tag_value)
        self._clock = clock
        self._lock = threading.Lock()
        self._created: Dict[str, float] = {}  # task id -> when it was created (monotonic)
        # by kind of request ("list", "get"): its mean seconds in the latest round that made
        # such requests, and this round's times so far
        self._mean_s: Dict[str, Optional[float]] = {"list": None, "get": None}
        self._times: Dict[str, List[float]] = {"list": [], "get": []}
        self._rounds_by_id = 0  # in a row, since the lists were last timed
        # kept for the whole run: its threads start on the first round that needs them
        self._pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="crank-tes-state")

    def add(self, task_id: str) -> None:
        with self._lock:
            self._created[task_id] = time.monotonic()

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._created.pop(task_id, None)

    def round(self) -> Dict[str, str]:
        """The TES state of every watched task the server shows (none asked when nothing is
        watched); raises what a request raises, except a 404 for a task not visible."""
        with self._lock:
            watched = set(self._created)
        if not watched:
            return {}
        try:
            states = self._listed(watched) if self._lists_faster(len(watched)) else {}
            ask = watched - states.keys()
            if not ask and states and self._mean_s["get"] is None and not self.api.filters_unreliable:
                ask = {min(states)}  # once: what a GetTask costs, to compare
            states.update(self._looked_up(ask))
        finally:
            with self._lock:
                for kind, times in self._times.items():
                    if times:
                        self._mean_s[kind] = sum(times) / len(times)
                        times.clear()
        with self._lock:
            return {i: s for i, s in states.items() if i in self._created}

    def _lists_faster(self, watched: int) -> bool:
        """Whether this round lists (see the module's docstring)."""
        if watched <= FEW or self.api.filters_unreliable:
            return False
        with self._lock:
            list_s, get_s = self._mean_s["list"], self._mean_s["get"]
        by_id_s = math.ceil(watched / LOOKUP_THREADS) * get_s if get_s is not None else None
        if list_s is None or by_id_s is None or self._rounds_by_id >= REMEASURE_ROUNDS:
            faster = True
        else:
            faster = len(LISTED_STATES) * list_s <= by_id_s
        self._rounds_by_id = 0 if faster else self._rounds_by_id + 1
        return faster

    def _timed(self, kind: str, request: Callable):
        """``request()``, its time counted among this round's of ``kind`` ("list", "get")."""
        started = self._clock()
        try:
            return request()
        finally:
            seconds = self._clock() - started
            with self._lock:
                self._times[kind].append(seconds)

    def _listed(self, watched: Set[str]) -> Dict[str, str]:
        found: Dict[str, str] = {}
        for state in LISTED_STATES:
            tasks = self._timed("list", lambda: self.api.list_tasks(
                *self.tag, bounded=True, states=(state,)))
            found.update((t.id, t.state or "UNKNOWN") for t in tasks if t.id in watched)
            if self.api.filters_unreliable:
                break  # what the lists missed is asked by id, and so is every task from now on
        return found

    def _looked_up(self, ids: Iterable[str]) -> Dict[str, str]:
        ids = list(ids)
        if not ids:
            return {}
        answers = [self._state(ids[0])] if len(ids) == 1 else list(self._pool.map(self._state, ids))
        return {i: s for i, s in zip(ids, answers) if s is not None}

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _state(self, task_id: str):
        try:
            return self._timed("get", lambda: self.api.get_task(task_id, view="MINIMAL")).state or "UNKNOWN"
        except HttpError as e:
            if e.status == 404:
                return None  # not visible (yet): young, or lost once its grace is over
            raise

    def young(self, task_id: str) -> bool:
        """Created so recently that the server may not show it yet."""
        with self._lock:
            created = self._created.get(task_id)
        return created is not None and time.monotonic() - created < APPEAR_GRACE_S
