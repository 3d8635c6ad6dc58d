"""The TES API's requests, on one HTTP session; answers parsed into py-tes models."""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import attr
import tes
from tes.utils import UnmarshalError, camel_to_snake, unmarshal

from ...errors import BackendUnavailable, CrankError
from .http import CREATE, HttpError, Session, Throttled

# the models inside a model, as py-tes's unmarshal nests them
NESTED = {
    tes.ListTasksResponse: {"tasks": tes.Task},
    tes.Task: {"logs": tes.TaskLog, "inputs": tes.Input, "outputs": tes.Output,
               "resources": tes.Resources, "executors": tes.Executor},
    tes.TaskLog: {"logs": tes.ExecutorLog, "outputs": tes.OutputFileLog},
}
STATES = set(attr.fields(tes.Task).state.validator.validator.options)


def known_fields(answer: Any, model: Type) -> Any:
    """``answer`` without what py-tes's models would refuse: fields a server adds beyond
    the TES schema (extensions are allowed), and a state newer than py-tes (read as
    UNKNOWN, i.e. not ended)."""
    if isinstance(answer, list):
        return [known_fields(item, model) for item in answer]
    if not isinstance(answer, dict):
        return answer
    names = {f.name for f in attr.fields(model)}
    nested = NESTED.get(model, {})
    kept = {}
    for key, value in answer.items():
        key = camel_to_snake(key)
        if key in names:
            kept[key] = known_fields(value, nested[key]) if key in nested else value
    if model is tes.Task and kept.get("state") not in STATES | {None}:
        kept["state"] = "UNKNOWN"
    return kept


def id_and_state(task: Any) -> Any:
    """A task as the MINIMAL view defines it: a server that sends whole tasks anyway (Funnel
    with a tag filter) costs no parsing of what a status round ignores."""
    return {k: task[k] for k in ("id", "state") if k in task} if isinstance(task, dict) else task


def minimal(answer: Any) -> Any:
    """A MINIMAL list answer, each task cut to id and state."""
    if not isinstance(answer, dict) or not isinstance(answer.get("tasks"), list):
        return answer
    return {**answer, "tasks": [id_and_state(t) for t in answer["tasks"]]}


# Microsoft TES accepts at most 2047; Funnel 2048
PAGE_SIZE = 2047
# Status rounds, collections, cancels and the shutdown run on Snakemake's loop: one attempt,
# a bounded wait. A server that does not answer then fails the round, and the runner tries
# again next round within its tolerance (retrying reads here would hold the loop for minutes).
BOUNDED_READ_TIMEOUT_S = 20.0
BOUNDED = {"timeout": BOUNDED_READ_TIMEOUT_S, "retry_reads": False}
CREATE_ATTEMPTS = 5
# the longest a create waits at once for a server that asked it to (429, Retry-After)
CREATE_WAIT_MAX_S = 30.0
# A server that asks crank to wait (429, 503 with Retry-After) did nothing: such answers do
# not use up CREATE_ATTEMPTS, since a busy server at the start of a wide run throttles every
# create for a while; a create still throttled after this long fails
CREATE_THROTTLED_MAX_S = 900.0

Model = TypeVar("Model")


class TesApi:
    """``report(line)`` is told, once, that the server refuses or ignores the filters of
    ListTasks."""

    def __init__(self, http: Session, report: Callable[[str], None]):
        self.http = http
        self.report = report
        # the server refuses or ignores ListTasks' filters: a listing may hold every task
        # on the server, and a status round asks for each task by id
        self.filters_unreliable = False
        self._filters_refused = False  # 400: listings are sent without them
        self._said_older = False

    def service_info(self) -> Mapping[str, Any]:
        """The server's description; raises BackendUnavailable (Throttled too) for the caller
        to say what to check."""
        info = self.http.request("GET", "/v1/service-info", "service-info", timeout=20)
        if not isinstance(info, dict):
            raise CrankError(f"{self.http.base}/v1/service-info is not a TES service-info")
        return info

    def list_tasks(
        self, tag_key: str, tag_value: str, view: str = "MINIMAL", bounded: bool = False,
        states: Sequence[str] = (), kind: str = "list",
    ) -> List[tes.Task]:
        """Every task with the tag and, when ``states`` are given, in one of them: one
        filtered listing per state (TES 1.1's filters), following page tokens.
        ``bounded``: one attempt per request with a bounded wait (see BOUNDED); ``kind``:
        what the session counts the requests as.

        The server's filters are not trusted: a TES 1.0 server refuses them (400) or ignores
        them, and so does a proxy that drops the query. Then one listing of every task on the
        server stands for all the states, and the tag and state of each task are checked
        here (``older`` says so once). MINIMAL carries no tags: use it only to look up ids
        crank made itself. py-tes's own ``list_tasks`` sends no tag filter, hence this
        request."""
        found: Dict[str, tes.Task] = {}
        for state in states or (None,):
            tasks, every_state = self._listing(tag_key, tag_value, view, bounded, state, kind)
            found.update((t.id, t) for t in tasks)
            if every_state:
                break
        listed = [t for t in found.values() if not states or (t.state or "UNKNOWN") in states]
        if view == "MINIMAL":
            return listed
        mine = [t for t in listed if (t.tags or {}).get(tag_key) == tag_value]
        if len(mine) < len(listed):
            self.older("ignores the tag filter of ListTasks")
        return mine

    def older(self, how: str) -> None:
        """The server refuses or ignores ListTasks' filters, as ``how`` says: said once per
        run; from then on ``filters_unreliable``."""
        self.filters_unreliable = True
        if not self._said_older:
            self._said_older = True
            self.report(
                f"the TES server at {self.http.base} {how}, as a TES 1.0 server does (or a proxy "
                "that drops query parameters): crank checks every task's tags itself, touches "
                "only its own, and asks for its running tasks by id")

    def _listing(self, tag_key: str, tag_value: str, view: str, bounded: bool,
                 state: Optional[str], kind: str) -> Tuple[List[tes.Task], bool]:
        """(the tasks one listing found, whether they stand for every state)."""
        if not self._filters_refused:
            params = {"tag_key": tag_key, "tag_value": tag_value}
            if state:
                params["state"] = state
            try:
                tasks = self._pages(params, view, bounded, kind)
            except HttpError as e:
                if e.status != 400:
                    raise
                self._filters_refused = True
                self.older(f"refuses the filters of ListTasks (HTTP {e.status})")
            else:
                ignored = state is not None and any((t.state or "UNKNOWN") != state for t in tasks)
                if ignored:
                    self.older("ignores the state filter of ListTasks")
                return tasks, state is None or ignored
        return self._pages({}, view, bounded, kind), True

    def _pages(self, filters: Mapping[str, str], view: str, bounded: bool, kind: str) -> List[tes.Task]:
        """Every page of one listing."""
        found: List[tes.Task] = []
        token = None
        tokens_seen: set = set()
        ids_seen: set = set()
        while True:
            params = {**filters, "view": view, "page_size": PAGE_SIZE}
            if token:
                params["page_token"] = token
            answer = self.http.request("GET", "/v1/tasks", kind, params=params, **(
                BOUNDED if bounded else {}))
            if view == "MINIMAL":
                answer = minimal(answer)
            page = self._parse(answer or {}, tes.ListTasksResponse, "GET /v1/tasks", "a task list")
            ids = {t.id for t in page.tasks or []}
            if page.tasks and (page.next_page_token in tokens_seen or ids <= ids_seen):
                # a gateway that drops the query string answers the first page for ever; a
                # listing cut short would make crank cancel or adopt on half the truth
                raise CrankError(
                    f"the TES server at {self.http.base} answers GET /v1/tasks with a page it sent "
                    "before (does a gateway in front of it drop the query string?); crank cannot "
                    "list its tasks: fix the gateway or point --crank-tes-url at the server")
            tokens_seen.add(page.next_page_token)
            ids_seen |= ids
            found.extend(page.tasks or [])
            token = page.next_page_token
            if not token or not page.tasks:
                return found

    def get_task(self, task_id: str, view: str = "FULL") -> tes.Task:
        """The task in ``view``; a MINIMAL answer is cut to id and state. Kind of request:
        ``state`` for MINIMAL (a status round's), ``get`` otherwise."""
        path = f"/v1/tasks/{task_id}"
        minimal_view = view == "MINIMAL"
        answer = self.http.request("GET", path, "state" if minimal_view else "get",
                                   params={"view": view}, **BOUNDED)
        if minimal_view:
            answer = id_and_state(answer)
        return self._parse(answer, tes.Task, f"GET {path}", "a task")

    def create_task(self, body: Mapping[str, Any], tag_key: str, tag_value: str,
                    stopping: Callable[[], bool]) -> str:
        """POST the task, whose tag ``tag_key`` is ``tag_value`` and names it alone; after an
        answer that may hide a created task, look it up by that tag before posting again, so
        a retry never makes a second task."""
        delay = 0.5
        unsure = False  # an earlier attempt may have created the task
        failures = 0
        throttled_until = time.monotonic() + CREATE_THROTTLED_MAX_S
        while True:
            try:
                if unsure:
                    if stopping():  # a task the lost answer hid is canceled by the shutdown
                        raise CrankError("the run ended before the task was created")
                    found = self.list_tasks(tag_key, tag_value, view="BASIC", bounded=True)
                    if found:
                        return found[0].id
                answer = self.http.request("POST", "/v1/tasks", CREATE, body=body, retry_reads=False)
                created = self._parse(answer, tes.CreateTaskResponse, "POST /v1/tasks", "a task id")
                if not created.id:
                    raise BackendUnavailable(
                        f"the TES server at {self.http.base} answered POST /v1/tasks without a task id")
                return created.id
            except HttpError as e:
                raise CrankError(f"the TES server refused the task: {e}") from None
            except Throttled as e:
                if time.monotonic() >= throttled_until:
                    raise BackendUnavailable(
                        f"{e}; it has asked crank to wait for more than "
                        f"{CREATE_THROTTLED_MAX_S / 60:.0f} minutes") from None
                # jitter spreads the workers that were all told to wait out
                wait = min(e.retry_after or delay, CREATE_WAIT_MAX_S) * random.uniform(1.0, 1.25)
            except BackendUnavailable:
                unsure = True
                failures += 1
                if failures == CREATE_ATTEMPTS:
                    raise
                wait = delay
            _sleep_unless(stopping, wait)
            if stopping():
                raise CrankError("the run ended before the task was created")
            delay = min(delay * 2, 8)

    def cancel_task(self, task_id: str) -> None:
        """Cancel the task; one that is gone (404) needs nothing."""
        try:
            self.http.request("POST", f"/v1/tasks/{task_id}:cancel", "cancel", **BOUNDED)
        except HttpError as e:
            if e.status != 404:
                raise CrankError(f"the TES server refused to cancel task {task_id}: {e}") from None

    def _parse(self, answer: Any, model: Type[Model], request: str, what: str) -> Model:
        try:
            parsed = unmarshal(known_fields(answer, model), model)
        except (UnmarshalError, TypeError):
            parsed = None
        if parsed is None:
            raise BackendUnavailable(
                f"the TES server at {self.http.base} answered {request} with something other "
                f"than {what}")
        return parsed


def _sleep_unless(stopping: Callable[[], bool], seconds: float) -> None:
    """Sleep ``seconds``, cut short once ``stopping()`` (checked every second)."""
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 1.0))
