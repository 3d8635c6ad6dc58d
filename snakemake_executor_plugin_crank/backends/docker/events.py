"""How the warm pool learns that an exec ended or a runner stopped: the run's event
stream from the engine, and a safety net for the ends the stream does not bring.

The pool registers each exec it starts (``add_exec``, ``remove_exec``) and each runner
while it is idle (``add_idle``, ``remove_idle``); the watcher tells it what happened
through the callbacks it was made with, never holding a lock of its own while it does.
The safety net: after the stream reconnects (the engine restarted, the connection broke)
every registered exec and idle runner is checked once, and every
``check_interval`` seconds the execs running for longer than ``check_age`` seconds are
inspected, ``check_batch`` per round, the least recently checked first. An exec the
engine no longer knows (an engine restart forgets them) is judged by its runner.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import docker.errors

from .engine import LABEL_RUN

# every CHECK_INTERVAL_S, at most CHECK_BATCH execs running for more than CHECK_AGE_S
# are inspected
CHECK_INTERVAL_S = 5.0
CHECK_AGE_S = 10.0
CHECK_BATCH = 8


@dataclass(eq=False)
class _Exec:
    exec_id: str
    runner_id: str
    started: float  # monotonic
    checked: float = 0.0  # when the safety net last inspected it (monotonic)


@dataclass(frozen=True)
class Callbacks:
    """What the watcher reports, each with the ids the pool registered."""

    exited: Callable[[str, Optional[int]], None]  # exec id, exit code (None: unknown)
    oom: Callable[[str], None]  # runner id: a process in it ran out of memory
    stopped: Callable[[str], None]  # runner id: its container is not running
    lost: Callable[[str], None]  # exec id: the engine forgot it, its runner still runs


class Watcher:
    """Watches one run's execs and idle runners (see the module text)."""

    def __init__(self, api, events_api, run_id: str, report: Callbacks):
        self.api = api  # shared with the pool: inspections only
        self.events_api = events_api  # the stream's own
        self.run_id = run_id
        self.report = report
        self.lock = threading.Lock()
        self.execs: Dict[str, _Exec] = {}
        self.idle: set = set()  # runner ids
        self.check_interval = CHECK_INTERVAL_S
        self.check_age = CHECK_AGE_S
        self.check_batch = CHECK_BATCH
        self.closed = False
        self.stopping = threading.Event()
        self.recheck = threading.Event()  # check everything now (the stream reconnected)
        self.stream = None
        self.stream_ok = False  # the event stream is connected
        self.since = time.time()
        self.watching = threading.Event()

    def start(self) -> None:
        """Connect the stream (waiting a little for it) and start the checks."""
        threading.Thread(target=self._watch, name="crank-events", daemon=True).start()
        threading.Thread(target=self._check_loop, name="crank-check", daemon=True).start()
        self.watching.wait(10)

    def add_exec(self, exec_id: str, runner_id: str) -> None:
        with self.lock:
            self.execs[exec_id] = _Exec(exec_id, runner_id, time.monotonic())

    def remove_exec(self, exec_id: str) -> None:
        with self.lock:
            self.execs.pop(exec_id, None)

    def add_idle(self, runner_id: str) -> None:
        with self.lock:
            self.idle.add(runner_id)

    def remove_idle(self, runner_id: str) -> None:
        with self.lock:
            self.idle.discard(runner_id)

    def close(self) -> None:
        self.closed = True
        self.stopping.set()
        self.recheck.set()
        with contextlib.suppress(Exception):
            if self.stream is not None:
                self.stream.close()
        self.events_api.close()

    # ---- the event stream -------------------------------------------------------------

    def _watch(self) -> None:
        filters = {"label": f"{LABEL_RUN}={self.run_id}", "type": "container"}
        connected = False
        while not self.closed:
            try:
                self.stream = self.events_api.events(filters=filters, decode=True, since=self.since)
                if connected:
                    # events may have been lost while the stream was down (an engine that
                    # restarted keeps none): check every running exec and idle runner
                    self.recheck.set()
                connected = self.stream_ok = True
                self.watching.set()
                for event in self.stream:
                    self.since = event.get("time", self.since)
                    self._on_event(event)
            except Exception:  # noqa: BLE001 - reconnect, replaying from `since`
                pass
            self.stream_ok = False
            if self.closed:
                return
            self.watching.set()
            if self.stopping.wait(0.5):
                return

    def _on_event(self, event: Mapping[str, Any]) -> None:
        action = event.get("Action") or ""
        actor = event.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        container = actor.get("ID") or event.get("id") or ""
        if action == "oom":
            self.report.oom(container)
        elif action.startswith("exec_die"):
            exec_id, code = attrs.get("execID", ""), attrs.get("exitCode")
            self.remove_exec(exec_id)
            self.report.exited(exec_id, int(code) if code not in (None, "") else None)
        elif action == "die":
            self.report.stopped(container)

    # ---- the safety net: ends the event stream did not bring ---------------------------

    def _check_loop(self) -> None:
        while not self.closed:
            everything = self.recheck.wait(self.check_interval)
            if self.closed:
                return
            self.recheck.clear()
            try:
                self._check(everything)
            except Exception:  # noqa: BLE001 - the engine may be down: next round
                if everything:
                    self.recheck.set()
                    self.stopping.wait(1)

    def _check(self, everything: bool) -> None:
        """Inspect running execs: all of them (after the stream reconnected), or the few
        oldest-checked of those running for more than ``check_age`` seconds; after a
        reconnection also every idle runner."""
        now = time.monotonic()
        with self.lock:
            execs = [e for e in self.execs.values() if everything or now - e.started > self.check_age]
            idle = list(self.idle) if everything else []
        execs.sort(key=lambda e: e.checked)
        if not everything:
            execs = execs[: self.check_batch]
        for watched in execs:
            self._check_exec(watched)
        for runner_id in idle:
            if not self._runner_running(runner_id):
                self.report.stopped(runner_id)

    def _check_exec(self, watched: _Exec) -> None:
        watched.checked = time.monotonic()
        try:
            info = self.api.exec_inspect(watched.exec_id)
        except docker.errors.NotFound:
            info = None  # an engine that restarted forgets its execs
        if info is not None and info.get("Running"):
            return
        code = info.get("ExitCode") if info is not None else None
        if code is not None:
            self.remove_exec(watched.exec_id)
            self.report.exited(watched.exec_id, int(code))
        elif not self._runner_running(watched.runner_id):
            self.report.stopped(watched.runner_id)
        else:
            self.report.lost(watched.exec_id)

    def _runner_running(self, runner_id: str) -> bool:
        """Whether the runner's container runs; raises when the engine does not answer."""
        try:
            inspected = self.api.inspect_container(runner_id)
        except docker.errors.NotFound:
            return False
        return bool((inspected.get("State") or {}).get("Running"))
