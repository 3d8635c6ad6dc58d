"""What earlier runs of the workdir left on the TES server: the dead runs' tasks a job of
this run may adopt (``adoption``), and the tasks of runs that are gone, canceled."""

from __future__ import annotations

from typing import Callable, Collection, List, Mapping, Tuple

import tes

from ...errors import CrankError
from ...staging.store import Store
from ..adoption import Orphan, Orphans
from .api import TesApi
from .tasks import (
    ADOPTABLE_ENDS,
    CLOSE_STATES,
    NON_TERMINAL,
    TAG_KEY,
    TAG_ORIGIN,
    TAG_PRODUCTS,
    TAG_RUN,
    TAG_SUBMISSION,
    TAG_WORKDIR,
    executor_start,
)


def gather(api: TesApi, store: Store, tags: Mapping[str, str], keep: Collection[str],
           dead_runs: Collection[str], report: Callable[[str], None]) -> Tuple[int, Orphans]:
    """Keep the dead runs' tasks that can be adopted (running, or ended by themselves
    while nobody watched); cancel the other non-terminal tasks of runs that are gone (not
    in ``keep``). ``tags``: this run's. Returns (how many were canceled, what is kept)."""
    stale, found, others = [], [], 0
    for t in _left_behind(api, tags[TAG_WORKDIR], dead_runs):
        task_tags = t.tags or {}
        run = task_tags.get(TAG_RUN)
        if run in keep:
            continue
        if task_tags.get(TAG_ORIGIN, tags[TAG_ORIGIN]) != tags[TAG_ORIGIN]:
            others += t.state in NON_TERMINAL  # tasks of older cranks carry none: ours
            continue
        if run in dead_runs and task_tags.get(TAG_KEY) and ":" in task_tags.get(TAG_SUBMISSION, ""):
            found.append(Orphan(task_tags[TAG_KEY], task_tags.get(TAG_PRODUCTS, ""),
                                (t.id, task_tags[TAG_SUBMISSION]), finished=t.state not in NON_TERMINAL,
                                started=executor_start(t)))
        elif t.state in NON_TERMINAL:
            stale.append(t.id)
    if others:
        report(f"{others} task(s) on the TES server come from another directory at this "
               "path (another machine or user); left alone")
    for task_id in stale:
        api.cancel_task(task_id)
    return len(stale), Orphans(_uncollected(store, found))


def _left_behind(api: TesApi, workdir: str, dead_runs: Collection[str]) -> List[tes.Task]:
    """The workdir's tasks that may still wait or run (one list per active state), and
    the dead runs' tasks that ended by themselves (one list per dead run and end): what
    a start costs follows what is active and what dead runs left, not the workdir's
    history. A server whose filters do not work lists everything it holds at once."""
    tasks = api.list_tasks(TAG_WORKDIR, workdir, view="BASIC", states=CLOSE_STATES)
    if not dead_runs:
        return tasks
    if api.filters_unreliable:
        ended = api.list_tasks(TAG_WORKDIR, workdir, view="BASIC", states=ADOPTABLE_ENDS)
        tasks += [t for t in ended if (t.tags or {}).get(TAG_RUN) in dead_runs]
    else:
        for run in dead_runs:
            tasks += api.list_tasks(TAG_RUN, run, view="BASIC", states=ADOPTABLE_ENDS)
    return list({t.id: t for t in tasks}.values())  # one that ended between two lists: once


def _uncollected(store: Store, found: List[Orphan]) -> List[Orphan]:
    """Without the ended tasks their run collected and released: their products are gone
    from the store (one list per dead run)."""
    runs_ended = {o.ref[1].split(":", 1)[0] for o in found if o.finished}
    kept = set()
    for run in runs_ended:
        prefix = f"runs/{run}/"
        try:
            kept.update(f"{run}:{k[len(prefix):].split('/', 1)[0]}" for k, _ in store.list(prefix))
        except CrankError:
            pass  # cannot tell: none of that run's ended tasks is adopted
    return [o for o in found if not o.finished or o.ref[1] in kept]
