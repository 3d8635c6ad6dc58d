"""The TES status round's plan (backends/tes/monitor.py), as pure logic against an in-memory
TES server that answers what Funnel answers: what a round asks and what comes back grows
with the tasks still watched, not with the tasks the run finished."""

import threading
from typing import Dict, List, Optional

import pytest
from tes import Task

from snakemake_executor_plugin_crank.backends.tes import monitor as monitor_module
from snakemake_executor_plugin_crank.backends.tes.api import TesApi
from snakemake_executor_plugin_crank.backends.tes.http import HttpError
from snakemake_executor_plugin_crank.backends.tes.monitor import (
    FEW,
    LISTED_STATES,
    LOOKUP_THREADS,
    REMEASURE_ROUNDS,
    Monitor,
)

TAG = ("crank-run", "run-1")


class Server:
    """A task table behind TES's two reads, answering as the HTTP session a TesApi sends
    them through. ``filters`` of ListTasks: "honours" them (Funnel), "ignores state",
    "ignores" both tag and state, or "refuses" them (400; TES 1.0 servers). Each request
    takes ``list_s`` or ``get_s`` seconds on a clock of the thread that sent it (``clock``),
    so what the Monitor measures does not depend on this machine."""

    base = "http://tes.example"

    def __init__(self, filters: str = "honours", list_s: float = 0.001, get_s: float = 0.01):
        self.filters, self.list_s, self.get_s = filters, list_s, get_s
        self._time = threading.local()
        self.states: Dict[str, str] = {}
        self.tags: Dict[str, str] = {}
        self.refuse_gets: Optional[int] = None  # the status every GetTask is answered with
        self.requests: List[tuple] = []
        self.tasks_sent = 0
        self.reported: List[str] = []

    def clock(self) -> float:
        return getattr(self._time, "now", 0.0)

    def _spend(self, seconds: float) -> None:
        self._time.now = self.clock() + seconds

    def add(self, task_id: str, state: str, run: str = TAG[1]) -> None:
        self.states[task_id] = state
        self.tags[task_id] = run

    def api(self) -> TesApi:
        return TesApi(self, self.reported.append)

    def request(self, method: str, path: str, kind: str, params=None, **kwargs):
        params = params or {}
        if path == "/v1/tasks":
            self.requests.append(("list", params.get("state")))
            self._spend(self.list_s)
            if self.filters == "refuses" and {"tag_key", "tag_value", "state"} & params.keys():
                raise HttpError("the TES server refused GET /v1/tasks: HTTP 400: unknown field state", 400)
            tag = params.get("tag_value") if self.filters in ("honours", "ignores state") else None
            state = params.get("state") if self.filters == "honours" else None
            found = [{"id": i, "state": s, "tags": {TAG[0]: self.tags[i]}} for i, s in self.states.items()
                     if tag in (None, self.tags[i]) and state in (None, s)]
            self.tasks_sent += len(found)
            return {"tasks": found}
        task_id = path.rsplit("/", 1)[1]
        self.requests.append(("get", task_id))
        self._spend(self.get_s)
        if self.refuse_gets:
            raise HttpError(f"{self.refuse_gets} from the TES server", self.refuse_gets)
        if task_id not in self.states:
            raise HttpError("404 from the TES server", 404)
        self.tasks_sent += 1
        return {"id": task_id, "state": self.states[task_id]}


def watching(server: Server, ids) -> Monitor:
    monitor = Monitor(server.api(), *TAG, clock=server.clock)
    for task_id in ids:
        monitor.add(task_id)
    return monitor


def test_a_round_pays_for_the_watched_tasks_not_for_the_finished_ones():
    """9,900 of 10,000 tasks finished and released, 100 still running, and 5,000 tasks of
    other runs: a round is one list per active state and carries the 100 tasks only (the
    old round listed all 10,000 of the run)."""
    server = Server()
    for i in range(10_000):
        server.add(f"t{i}", "COMPLETE" if i < 9_900 else "RUNNING")
    for i in range(5_000):
        server.add(f"other{i}", "RUNNING", run="run-0")
    monitor = watching(server, [f"t{i}" for i in range(9_900, 10_000)])
    states = monitor.round()
    assert states == {f"t{i}": "RUNNING" for i in range(9_900, 10_000)}
    # and once in a run, one task by id: what a GetTask costs, to compare with the lists
    assert server.requests == [("list", s) for s in LISTED_STATES] + [("get", "t9900")]
    assert server.tasks_sent == 101
    server.requests.clear()
    monitor.round()
    assert server.requests == [("list", s) for s in LISTED_STATES]


def test_a_task_that_ended_since_the_last_round_is_reported_with_its_end_state():
    server = Server()
    for i in range(20):
        server.add(f"t{i}", "QUEUED" if i % 2 else "RUNNING")
    monitor = watching(server, server.states)
    assert set(monitor.round().values()) == {"QUEUED", "RUNNING"}
    server.states.update(t0="COMPLETE", t1="EXECUTOR_ERROR", t2="CANCELING", t3="PREEMPTED")
    server.requests.clear()
    states = monitor.round()
    assert [states[f"t{i}"] for i in range(4)] == ["COMPLETE", "EXECUTOR_ERROR", "CANCELING", "PREEMPTED"]
    assert sorted(r for r in server.requests if r[0] == "get") == [("get", f"t{i}") for i in range(4)]
    for i in range(4):  # the backend releases an ended task once it reported it
        monitor.remove(f"t{i}")
    server.requests.clear()
    monitor.round()
    assert [r[0] for r in server.requests] == ["list"] * len(LISTED_STATES)


def test_a_task_not_visible_yet_is_left_out_and_young():
    server = Server()
    for i in range(FEW + 1):
        server.add(f"t{i}", "RUNNING")
    monitor = watching(server, list(server.states) + ["unseen"])
    states = monitor.round()
    assert "unseen" not in states and len(states) == FEW + 1
    assert monitor.young("unseen")
    monitor_module.APPEAR_GRACE_S, grace = 0.0, monitor_module.APPEAR_GRACE_S
    try:
        assert not monitor.young("unseen")
    finally:
        monitor_module.APPEAR_GRACE_S = grace


def test_few_watched_tasks_are_asked_by_id():
    server = Server()
    for i in range(100):
        server.add(f"t{i}", "COMPLETE")
    server.add("mine", "RUNNING")
    monitor = watching(server, ["mine"])
    assert monitor.round() == {"mine": "RUNNING"}
    assert server.requests == [("get", "mine")]


@pytest.mark.parametrize("filters", ["ignores state", "ignores"])
def test_a_server_that_ignores_the_state_filter_still_gets_every_state_right(filters):
    server = Server(filters)
    for i in range(30):
        server.add(f"t{i}", "COMPLETE" if i < 10 else "RUNNING")
    server.add("other", "RUNNING", run="run-0")
    monitor = watching(server, [f"t{i}" for i in range(30)])
    expected = {f"t{i}": "COMPLETE" if i < 10 else "RUNNING" for i in range(30)}
    assert monitor.round() == expected
    # that list held every state: what it did not show running is asked by id
    assert server.requests[0] == ("list", LISTED_STATES[0])
    assert sorted(server.requests[1:]) == sorted(("get", f"t{i}") for i in range(10))
    assert len(server.reported) == 1 and "ignores the state filter" in server.reported[0]
    server.requests.clear()
    assert monitor.round() == expected
    assert {r[0] for r in server.requests} == {"get"} and len(server.requests) == 30
    assert len(server.reported) == 1


def test_a_refusal_of_a_lookup_fails_the_round():
    server = Server()
    server.add("t0", "RUNNING")
    monitor = watching(server, ["t0"])
    server.refuse_gets = 401
    with pytest.raises(HttpError):
        monitor.round()


def test_nothing_watched_asks_nothing():
    server = Server()
    server.add("t0", "RUNNING")
    assert Monitor(server.api(), *TAG).round() == {}
    assert server.requests == []


def test_a_server_whose_lists_cost_more_than_lookups_is_asked_by_id():
    """50,000 tasks of earlier runs make each filtered list walk them all (0.5 s here) while
    a GetTask stays one lookup (2 ms): after one round of lists, which times both kinds,
    rounds ask each watched task by id, and list again every REMEASURE_ROUNDS rounds; once
    the lists are fast again, rounds list."""
    server = Server(list_s=0.5, get_s=0.002)
    for i in range(100):
        server.add(f"t{i}", "RUNNING")
    monitor = watching(server, server.states)
    kinds = []
    for _ in range(REMEASURE_ROUNDS + 2):
        server.requests.clear()
        assert len(monitor.round()) == 100
        kinds.append({r[0] for r in server.requests})
    # the first round lists (3 x 0.5 s) and times one GetTask: 100 take 13 x 2 ms
    assert kinds[0] == {"list", "get"}
    assert kinds[1:REMEASURE_ROUNDS + 1] == [{"get"}] * REMEASURE_ROUNDS
    assert kinds[REMEASURE_ROUNDS + 1] == {"list"}
    assert 100 / LOOKUP_THREADS * 0.002 < len(LISTED_STATES) * 0.5
    server.list_s = 0.001
    for _ in range(REMEASURE_ROUNDS + 1):  # the next remeasure sees cheap lists
        monitor.round()
    server.requests.clear()
    monitor.round()
    assert {r[0] for r in server.requests} == {"list"}


def test_a_server_that_refuses_the_filters_is_asked_by_id():
    """A strict TES 1.0 server answers 400 to the state and tag filters: the round still
    gets every state, from one list of the whole server and then by id, and says so once."""
    server = Server("refuses")
    for i in range(20):
        server.add(f"t{i}", "RUNNING")
    monitor = watching(server, server.states)
    for _ in range(2):
        assert monitor.round() == {f"t{i}": "RUNNING" for i in range(20)}
    assert [r for r in server.requests if r[0] == "list"] == [("list", "RUNNING"), ("list", None)]
    assert len(server.reported) == 1 and "refuses the filters of ListTasks" in server.reported[0]


@pytest.mark.parametrize("filters", ["honours", "ignores state", "ignores", "refuses"])
def test_a_runs_end_lists_what_is_still_active_not_what_it_finished(filters):
    """What the backend cancels at the end of a run (backend.still_active): the run's
    waiting and running tasks, from lists that carry only those when the server honours the
    state filter; from one list of the whole run, or of the whole server, when it ignores or
    refuses (400) the filters; never another run's task."""
    from snakemake_executor_plugin_crank.backends.tes.backend import still_active

    server = Server(filters)
    for i in range(1000):
        server.add(f"done{i}", "COMPLETE")
    for state in ("RUNNING", "QUEUED", "INITIALIZING", "PAUSED"):
        server.add(f"{state.lower()}1", state)
    server.add("other", "RUNNING", run="run-2")
    active = {t.id for t in still_active(server.api(), TAG[1])}
    assert active == {"running1", "queued1", "initializing1", "paused1"}
    lists = [r for r in server.requests if r[0] == "list"]
    if filters == "honours":
        assert server.tasks_sent == 4 and len(lists) == 4
    elif filters == "ignores state":
        assert server.tasks_sent == 1004 and len(lists) == 1
    else:
        assert server.tasks_sent == 1005 and len(lists) == (1 if filters == "ignores" else 2)
    assert len(server.reported) == (filters != "honours")

def test_the_queue_view_says_what_waits_and_runs_when_it_changes_at_most_every_30_s():
    from snakemake_executor_plugin_crank.backends.tes.queue_view import INTERVAL_S, QueueView

    now = [0.0]
    said = []
    view = QueueView("http://tes.example", said.append, clock=lambda: now[0])
    view.update([])  # nothing submitted yet: silent
    view.update(["QUEUED"] * 40 + ["INITIALIZING"] * 12 + ["RUNNING"] * 96 + ["COMPLETE"] * 7)
    assert said == ["40 queued, 12 initializing, 96 running on http://tes.example"]
    view.update(["QUEUED"] * 40 + ["INITIALIZING"] * 12 + ["RUNNING"] * 96)
    now[0] += 5
    view.update(["RUNNING"] * 148)  # changed, but too soon
    assert len(said) == 1
    now[0] += INTERVAL_S
    view.update(["RUNNING"] * 148)
    assert said[-1] == "148 running on http://tes.example"
    now[0] += INTERVAL_S
    view.update(["RUNNING"] * 148)  # unchanged: silent
    view.update(["COMPLETE"] * 148)  # nothing waits or runs: silent
    assert len(said) == 2
