"""The runs of group jobs, by the files their jobs write. Snakemake submits a group job
again when another checkpoint's end updates the DAG while the group runs: the group's jobs
that wait for its own checkpoint are made anew, so the group counts as a new one, not
running; once it ended, those new jobs count as not finished, and the group is submitted
once more. The local executor runs each job once: here a submission of a group whose run is
in flight, or whose jobs all ran in this run, follows that run and ends as it ended, once
Snakemake has taken in its success (which can change the jobs of the group that follows).

At times the group submitted again is the very group object, whose set of jobs Snakemake
changed meanwhile, and with it its hash: its scheduler then holds it twice in its set of
running jobs (once under a hash it no longer has), can remove only one, and stops with
``KeyError: JobGroup`` at the second removal or waits for ever on the first. ``merge_twin``
makes the two one, as they are, and frees what the second submission took. A group whose jobs
changed while it ran, and that was not submitted again, is held under its old hash only:
``rehash_running`` holds it under its new one before its outcome is reported.

Thread-safe: jobs are handed over in Snakemake's main thread, their outcomes come in its
status thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from .scheduler import lock as scheduler_lock


SETTLE_S = 5.0


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
    jobs: Tuple[Any, ...] = ()  # its jobs as submitted
    attempt: int = 1
    ended: Optional[Ended] = None
    ended_at: float = 0.0

    def settled(self, dag: Any) -> bool:
        """Whether a submission that follows it can end now: once it failed, or once
        Snakemake has taken its success in (its jobs finished in ``dag``), which can change
        the jobs of the group that follows it; at the latest SETTLE_S after its end (a job
        Snakemake made anew may never count as finished)."""
        if self.ended is None:
            return False
        return (not self.ended.ok or all(dag.finished(j) for j in self.jobs)
                or time.monotonic() - self.ended_at >= SETTLE_S)


def _member(job: Any) -> Tuple[str, FrozenSet[str]]:
    """One job, as the same job made anew is still known: its rule and its files."""
    return job.rule.name, frozenset(str(f) for f in (*job.output, *job.log))


def _members(group: Any) -> FrozenSet[Tuple[str, FrozenSet[str]]]:
    return frozenset(_member(j) for j in group.jobs)


def _concerned(job: Any) -> bool:
    """A group holding a checkpoint: only its jobs can be made anew while it runs (a
    submission again may hold only those)."""
    return job.is_group() and any(j.is_checkpoint for j in job.jobs)


class GroupRuns:
    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight: List[Flight] = []
        self._succeeded: Dict[Tuple[str, FrozenSet[str]], Flight] = {}
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

    def ran(self, job: Any) -> Optional[Flight]:
        """When every job of the group job ``job`` succeeded in earlier runs of it: those
        runs as one, ended, which a new submission of it follows; else None."""
        if not job.is_group():
            return None
        with self._lock:
            runs = [self._succeeded.get(m) for m in _members(job)]
        # a retry (--retries) of a group Snakemake failed after its run runs anew
        if not runs or None in runs or any(r.attempt != job.attempt for r in runs):
            return None
        distinct = list({id(r): r for r in runs}.values())
        return Flight(_members(job), distinct[0].handle, job, tuple(j for r in distinct for j in r.jobs),
                      job.attempt, ended=Ended(ok=True), ended_at=max(r.ended_at for r in distinct))

    def start(self, job: Any, handle: str) -> Optional[Flight]:
        """``job``'s run (its chain's ``handle``) is in flight from now on (groups holding a
        checkpoint only)."""
        if not _concerned(job):
            return None
        flight = Flight(_members(job), handle, job, tuple(job.jobs), job.attempt)
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
            flight.ended, flight.ended_at = ended, time.monotonic()
            if ended.ok:
                self._succeeded.update(dict.fromkeys(flight.members, flight))
            if flight in self._in_flight:
                self._in_flight.remove(flight)


def merge_twin(workflow: Any, job: Any) -> bool:
    """``job``, a group object submitted again, is held twice in Snakemake's sets of running
    jobs (see the module text): make the two entries one and free what the second submission
    took. True when the first entry was still there, its run's outcome (reported, or to come)
    ending the group; False when Snakemake had already removed it, or its scheduler is not
    as expected (then nothing is changed). In Snakemake's main thread, which alone changes
    these sets."""
    scheduler, sets = _running_sets(workflow)
    free = getattr(scheduler, "_free_resources", None)
    if not sets or free is None or sum(1 for entry in sets[0] if entry is job) < 2:
        return False
    for entries in sets:
        _rehash(entries)
    free(job)
    return True


def rehash_running(workflow: Any, job: Any) -> None:
    """Before ``job``'s outcome is reported: a group whose set of jobs Snakemake changed while
    it ran is held in its sets of running jobs under a hash it no longer has, and the removal
    at its end would fail (``KeyError: JobGroup``); it is held under its hash now. Under the
    scheduler's lock, as Snakemake's main thread changes these sets."""
    _, sets = _running_sets(workflow)
    if not sets:
        return
    with scheduler_lock(workflow):
        for entries in sets:
            if job not in entries and any(entry is job for entry in entries):
                _rehash(entries)


def _running_sets(workflow: Any) -> Tuple[Any, List[set]]:
    """Snakemake's scheduler and its two sets of running jobs (the scheduler's, the DAG's);
    no sets when Snakemake is not as expected (then nothing is changed)."""
    scheduler = getattr(workflow, "scheduler", None)
    sets = [getattr(scheduler, "running", None), getattr(getattr(workflow, "dag", None), "_running", None)]
    return scheduler, (sets if all(isinstance(s, set) for s in sets) else [])


def _rehash(entries: set) -> None:
    """Each object once, under the hash it has now: from a list, as a set's copy keeps the
    hashes it holds."""
    held = list(entries)
    entries.clear()
    entries.update(held)
