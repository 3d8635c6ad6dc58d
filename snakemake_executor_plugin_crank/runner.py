"""Drives tasks on a backend: one status request per round for every active task,
wall-time limits, group chains, preemption.

A round is safe chain by chain: an error while handling one chain affects that chain
only, and what the backend holds for a task is released only once the caller has
reported the chain's outcome (``release``). The runner calls nothing of its caller: what
a round did is in what ``step`` returns and in each chain's ``succeeded``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .backends.base import Backend
from .errors import BackendUnavailable, CrankError, NotYet, failure_message
from .task import Adopted, State, TaskResult, TaskSpec


# a task the backend lost through no fault of its own (State.INTERRUPTED) runs again this often
INTERRUPTED_RETRIES = 1


@dataclass(eq=False)
class Chain:
    """The tasks of one Snakemake job (several for a group job), run one after another.
    ``tasks`` holds those built so far; each of ``later`` builds the next ones when they
    start, after the tasks before them have finished (a group's job may read what the jobs
    before it wrote to decide its resources and command)."""

    tasks: List[TaskSpec]
    later: List[Callable[[], Sequence[TaskSpec]]] = field(default_factory=list)
    index: int = 0
    # None while the current task still has to be submitted (the backend failed)
    handle: Optional[str] = None
    running_since: Optional[float] = None
    # past its wall time; ``stopped`` once the backend took the stop
    timed_out: bool = False
    stopped: bool = False
    preemptions: int = 0
    interruptions: int = 0
    log_files: List[str] = field(default_factory=list)
    # handles of collected tasks, released once the chain's outcome is reported
    spent: List[str] = field(default_factory=list)
    # when the backend started failing this chain (submit or collect), if it is
    trouble_since: Optional[float] = None
    # canceled by crank (Ctrl-C, giving up): no outcome is reported for it any more
    canceled: bool = False
    # the tasks that succeeded in the last round, with their results, for the caller
    succeeded: List[Tuple[TaskSpec, TaskResult]] = field(default_factory=list)
    # every task collected so far (the usage trace)
    ended: List["Attempt"] = field(default_factory=list)
    # when crank first submitted the current task (wall clock)
    submitted_at: Optional[float] = None

    @property
    def current(self) -> TaskSpec:
        return self.tasks[self.index]

    @property
    def handles(self) -> List[str]:
        return self.spent + ([self.handle] if self.handle else [])


@dataclass(frozen=True)
class Attempt:
    """A task that ran to its end: its result, when crank submitted it and when crank
    learned of its end (wall clock)."""

    task: TaskSpec
    result: TaskResult
    submitted_at: Optional[float]
    ended_at: float


class RoundFailed(BackendUnavailable):
    """A round's status request failed; ``failing_for``: seconds since the first round of
    this run of failures; ``given_up``: for longer than the tolerance."""

    def __init__(self, error: BackendUnavailable, failing_for: float, given_up: bool):
        super().__init__(str(error))
        self.failing_for = failing_for
        self.given_up = given_up


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""
    log_files: Tuple[str, ...] = ()
    error: Optional[CrankError] = None  # what the backend raised, when that ended the chain


class Runner:
    def __init__(
        self,
        backend: Backend,
        clock: Callable[[], float] = time.monotonic,
        preemptible_retries: int = 0,
        tolerance_s: float = 120.0,
    ):
        self.backend = backend
        self.clock = clock
        self.preemptible_retries = preemptible_retries
        # how long the backend may fail a chain, or every round's status request, before
        # the chains are reported failed: one clock per chain, one for the rounds
        self.tolerance_s = tolerance_s
        self.rounds_failing_since: Optional[float] = None

    def start(
        self, tasks: Sequence[TaskSpec], later: Sequence[Callable[[], Sequence[TaskSpec]]] = (),
        adopted: Optional[Adopted] = None,
    ) -> Chain:
        """Submit the first task; ``later`` build the tasks that follow ``tasks``, each when
        its turn comes, right after the task before it succeeded (a CrankError it raises
        fails the chain). Raises CrankError when the backend refuses the first task; when
        the backend does not answer (BackendUnavailable) the task is submitted again at the
        next rounds, for up to ``tolerance_s``. ``adopted``: a task a dead run left that does
        the first task's work (``Backend.adopt``), followed instead; its wall time counts
        from when it started."""
        chain = Chain(list(tasks), list(later))
        if adopted is not None:
            chain.handle = adopted.handle
            if adopted.ran_s is not None:
                chain.running_since = self.clock() - adopted.ran_s
            return chain
        try:
            self._submit(chain)
        except NotYet:
            pass  # submitted again at the next rounds
        except BackendUnavailable:
            chain.trouble_since = self.clock()
        return chain

    def step(self, chains: Sequence[Chain]) -> Dict[Chain, Outcome]:
        """Advance every chain by what happened since the last round; return the
        outcome of each chain that ended; each chain's ``succeeded`` holds its tasks that
        succeeded in this round. Raises RoundFailed only when the round's one status
        request fails."""
        if not chains:
            return {}
        for chain in chains:
            chain.succeeded = []
        now = self.clock()
        try:
            states = self.backend.poll([c.handle for c in chains if c.handle])
            self.rounds_failing_since = None
        except BackendUnavailable as e:
            if self.rounds_failing_since is None:
                self.rounds_failing_since = now
            failing_for = now - self.rounds_failing_since
            raise RoundFailed(e, failing_for, failing_for >= self.tolerance_s) from None
        now = self.clock()
        ended: Dict[Chain, Outcome] = {}
        for chain in chains:
            if chain.canceled:
                continue
            try:
                outcome = self._advance(chain, states.get(chain.handle), now)
                chain.trouble_since = None
            except NotYet:
                continue  # neither progress nor trouble
            except BackendUnavailable as e:
                if chain.trouble_since is None:
                    chain.trouble_since = now
                if now - chain.trouble_since < self.tolerance_s:
                    continue
                over = f"{self._wall_time(chain.current)}; " if chain.timed_out else ""
                outcome = self._failed(chain, f"{chain.current.label}: {over}the backend failed ({e})")
            except CrankError as e:
                outcome = self._failed(chain, str(e), e)
            except OSError as e:
                # e.g. a benchmark file that cannot be written: the job fails, the round goes on
                outcome = self._failed(chain, f"{chain.current.label}: {e}")
            if chain.canceled:
                continue  # canceled while this round ran: crank removed it, nothing to report
            if outcome is not None:
                ended[chain] = outcome
        return ended

    def _advance(self, chain: Chain, state: Optional[State], now: float) -> Optional[Outcome]:
        if chain.handle is None:
            self._submit(chain)
            return None
        if state is State.RUNNING:
            self._enforce_wall_time(chain, now)
            return None
        if state is None or not state.terminal:
            return None
        # a task already over its wall time is not run again from the start
        if state is State.PREEMPTED and not chain.timed_out and self._may_resubmit(chain):
            chain.preemptions += 1
            return self._resubmit(chain)
        if state is State.INTERRUPTED and not chain.timed_out and chain.interruptions < INTERRUPTED_RETRIES:
            chain.interruptions += 1
            return self._resubmit(chain)
        return self._finish_task(chain, state)

    def _resubmit(self, chain: Chain) -> None:
        chain.spent.append(chain.handle)
        chain.handle = None
        chain.running_since = None
        self._submit(chain)

    def _submit(self, chain: Chain) -> None:
        if chain.submitted_at is None:
            chain.submitted_at = time.time()
        chain.handle = self.backend.submit(chain.current)

    @staticmethod
    def _wall_time(task: TaskSpec) -> str:
        minutes, seconds = divmod(task.resources.runtime_s, 60)
        limit = " ".join(([f"{minutes} min"] if minutes else []) + ([f"{seconds} s"] if seconds else []))
        return f"wall time exceeded (runtime limit {limit})"

    def _may_resubmit(self, chain: Chain) -> bool:
        return chain.current.resources.preemptible and chain.preemptions < self.preemptible_retries

    def _enforce_wall_time(self, chain: Chain, now: float) -> None:
        if chain.running_since is None:
            chain.running_since = now
        limit = chain.current.resources.runtime_s
        if limit and now - chain.running_since > limit:
            chain.timed_out = True
        if chain.timed_out and not chain.stopped:
            try:
                self.backend.stop(chain.handle)
            except BackendUnavailable:
                raise  # tried again next round, within the tolerance
            except CrankError as e:
                raise CrankError(
                    f"{chain.current.label}: {self._wall_time(chain.current)}; "
                    f"crank could not stop it: {e}"
                ) from None
            chain.stopped = True

    def _finish_task(self, chain: Chain, state: State) -> Optional[Outcome]:
        task = chain.current
        result = self.backend.result(chain.handle, task)
        if chain.timed_out:
            result = dataclasses.replace(result, ok=False, reason=self._wall_time(task))
        elif state is State.PREEMPTED:
            retries = "" if not task.resources.preemptible else (
                f" {chain.preemptions} time(s), no preemptible retry left"
            )
            result = dataclasses.replace(result, ok=False, reason=f"preempted{retries}")
        elif state is State.CANCELED:
            result = dataclasses.replace(result, ok=False, reason="canceled outside crank")
        chain.log_files.extend(result.log_files)
        chain.ended.append(Attempt(task, result, chain.submitted_at, time.time()))
        chain.spent.append(chain.handle)
        chain.handle = None
        chain.submitted_at = None
        if not result.ok:
            return Outcome(False, failure_message(task, result), tuple(chain.log_files))
        chain.succeeded.append((task, result))
        if chain.index + 1 == len(chain.tasks):
            if not chain.later:
                return Outcome(True, log_files=tuple(chain.log_files))
            chain.tasks.extend(chain.later.pop(0)())
        chain.index += 1
        chain.running_since = None
        chain.timed_out = chain.stopped = False
        chain.preemptions = chain.interruptions = 0
        # a failure here leaves handle None: the next round submits again
        self._submit(chain)
        return None

    def _failed(self, chain: Chain, message: str, error: Optional[CrankError] = None) -> Outcome:
        return Outcome(False, message, tuple(chain.log_files), error)

    def release(self, chain: Chain) -> None:
        """Free what the backend holds for the chain, once its outcome is reported."""
        self.backend.release(chain.handles)
        chain.spent.clear()
        chain.handle = None

    def cancel(self, chains: Sequence[Chain]) -> None:
        """Stop and free the chains' tasks; raises BackendUnavailable when the backend
        cannot be reached (the tasks may then still run)."""
        for chain in chains:
            chain.canceled = True
        self.backend.cancel([h for c in chains for h in c.handles])

    @staticmethod
    def next_interval(chains: Sequence[Chain], now: float, ceiling: float) -> float:
        """Poll often while tasks are young (short jobs end fast), less as they age."""
        ages = [now - c.running_since for c in chains if c.running_since is not None]
        youngest = min(ages, default=0.0)
        return max(0.1, min(ceiling, youngest / 10))
