"""The runs of group jobs, by the files their jobs write. Snakemake submits a group job
again when another checkpoint's end updates the DAG while the group runs: the group's jobs
that wait for its own checkpoint are made anew, so the group counts as a new one, not
running; once it ended, those new jobs count as not finished, and the group is submitted
once more. The local executor runs each job once: here a submission of a group whose run is
in flight follows that run and ends as it ends, and one whose jobs all ran in this run
succeeds at once.

Thread-safe: jobs are handed over in Snakemake's main thread, their outcomes come in its
status thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, FrozenSet, List, Optional, Sequence, Set, Tuple


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
        flight = Flight(_members(job), handle)
        with self._lock:
            self._in_flight.append(flight)
        return flight

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
