"""The runs of group jobs, by the files their jobs write. Snakemake submits a group job
again when another checkpoint's end updates the DAG while the group runs: the group's jobs
that wait for its own checkpoint are made anew, so the group counts as a new one, not
running; once it ended, those new jobs count as not finished, and the group is submitted
once more. The local executor runs each job once: here a submission of a group whose run is
in flight follows that run and ends as it ends, and one whose jobs all ran in this run
succeeds at once.

At times the group submitted again is the very group object, whose set of jobs Snakemake
changed meanwhile, and with it its hash: its scheduler then holds it twice in its set of
running jobs (once under a hash it no longer has), can remove only one, and stops with
``KeyError: JobGroup`` at the second removal or waits for ever on the first. ``merge_twin``
makes the two one, as they are, and frees what the second submission took.

Thread-safe: jobs are handed over in Snakemake's main thread, their outcomes come in its
status thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple


@dataclass(frozen=True)
class Ended:
    """How a group job's run ended, for the submissions that followed it."""

    ok: bool
    message: str = ""
    logs: Sequence[str] = ()


@dataclass(eq=False)
class Flight:
    """One group job's run: its jobs, and its outcome once it ended."""

    members: FrozenSet[Tuple[str, FrozenSet[str]]]
    handle: str  # its chain's, which the submissions that follow it are known by
    job: Any  # the group object submitted
    ended: Optional[Ended] = None


def _member(job: Any) -> Tuple[str, FrozenSet[str]]:
    """One job, as the same job made anew is still known: its rule and its files."""
    return job.rule.name, frozenset(str(f) for f in (*job.output, *job.log))


def _members(group: Any) -> FrozenSet[Tuple[str, FrozenSet[str]]]:
    return frozenset(_member(j) for j in group.jobs)


class GroupRuns:
    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight: List[Flight] = []
        self._succeeded: Set[Tuple[str, FrozenSet[str]]] = set()
        # the group objects run, by identity (Snakemake changes their hash); each flight
        # holds its object, so that an id is not reused meanwhile
        self._objects: Dict[int, Flight] = {}

    def in_flight(self, job: Any) -> Optional[Flight]:
        """The run in flight of a group job that runs every job of ``job``, which a new
        submission of it follows; None when there is none."""
        if not job.is_group():
            return None
        members = _members(job)
        with self._lock:
            return next((f for f in self._in_flight if members <= f.members), None)

    def ran(self, job: Any) -> bool:
        """Whether every job of the group job ``job`` succeeded in an earlier run of it."""
        if not job.is_group():
            return False
        with self._lock:
            return _members(job) <= self._succeeded

    def start(self, job: Any, handle: str) -> Optional[Flight]:
        """``job``'s run (its chain's ``handle``) is in flight from now on (group jobs only)."""
        if not job.is_group():
            return None
        flight = Flight(_members(job), handle, job)
        with self._lock:
            self._in_flight.append(flight)
            self._objects[id(job)] = flight
        return flight

    def ran_object(self, job: Any) -> bool:
        """Whether this very group object was submitted and run before."""
        with self._lock:
            return id(job) in self._objects

    def end(self, flight: Optional[Flight], ended: Ended) -> None:
        """The run ended: the submissions that follow it end as it did."""
        if flight is None:
            return
        with self._lock:
            flight.ended = ended
            if ended.ok:
                self._succeeded |= flight.members
            if flight in self._in_flight:
                self._in_flight.remove(flight)


def merge_twin(workflow: Any, job: Any) -> bool:
    """``job``, a group object submitted again, is held twice in Snakemake's sets of running
    jobs (see the module text): make the two entries one and free what the second submission
    took. True when the first entry was still there, its run's outcome (reported, or to come)
    ending the group; False when Snakemake had already removed it, or its scheduler is not
    as expected (then nothing is changed)."""
    scheduler = getattr(workflow, "scheduler", None)
    running = getattr(scheduler, "running", None)
    free = getattr(scheduler, "_free_resources", None)
    dag_running = getattr(getattr(workflow, "dag", None), "_running", None)
    if not isinstance(running, set) or not isinstance(dag_running, set) or free is None:
        return False
    if sum(1 for entry in running if entry is job) < 2:
        return False
    for entries in (running, dag_running):
        # each object once, under the hash it has now: from a list, as a set's copy keeps
        # the hashes it holds
        held = list(entries)
        entries.clear()
        entries.update(held)
    free(job)
    return True
