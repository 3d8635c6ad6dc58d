"""Drives tasks on a backend in status rounds: one status request per round for every
active task, wall-time limits, group chains, preemption.

A round is safe chain by chain: an error while handling one chain affects that chain
only, and what the backend holds for a task is released only once the caller has
reported the chain's outcome (``release``). Nothing here calls its caller: ``step``
returns what a round did (a ``Round``), and a chain that waits for its next tasks gets
them from the caller through ``extend`` in the same round.
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
    ``tasks`` holds those handed down so far; ``to_come`` counts the batches of tasks still
    to be handed down (``Rounds.extend``): a group's later jobs, whose tasks the caller
    builds only once the jobs before them have finished (a group's job may read what the
    jobs before it wrote to decide its resources and command)."""

    tasks: List[TaskSpec]
    to_come: int = 0
    index: int = 0
    # None while the current task still has to be submitted (the backend failed), and
    # while the chain waits for its next tasks
    handle: Optional[str] = None
    # its tasks so far have succeeded; the next ones are still to come
    waiting: bool = False
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
    # every task collected so far (the usage trace)
    attempts: List["Attempt"] = field(default_factory=list)
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
    attempts: Tuple[Attempt, ...] = ()  # every task of the chain collected (the usage trace)


@dataclass
class Round:
    """What one round did: the outcome of each chain that ended; the tasks that succeeded,
    by chain, with their results; the chains whose tasks so far have succeeded and that
    wait for their next ones (``Rounds.extend``)."""

    ended: Dict[Chain, Outcome] = field(default_factory=dict)
    succeeded: Dict[Chain, List[Tuple[TaskSpec, TaskResult]]] = field(default_factory=dict)
    waiting: List[Chain] = field(default_factory=list)


class Rounds:
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
        self, tasks: Sequence[TaskSpec], to_come: int = 0, adopted: Optional[Adopted] = None,
    ) -> Chain:
        """Submit the first task; ``to_come``: how many batches of tasks follow ``tasks``,
        each handed down (``extend``) once the tasks before it have succeeded. Raises
        CrankError when the backend refuses the first task; when the backend does not
        answer (BackendUnavailable) the task is submitted again at the next rounds, for up
        to ``tolerance_s``. ``adopted``: a task a dead run left that does the first task's
        work (``Backend.adopt``), followed instead; its wall time counts from when it
        started."""
        chain = Chain(list(tasks), to_come)
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

    def step(self, chains: Sequence[Chain]) -> Round:
        """Advance every chain by what happened since the last round. Raises RoundFailed
        only when the round's one status request fails."""
        done = Round()
        if not chains:
            return done
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
        for chain in chains:
            if chain.canceled:
                continue
            outcome = self._guarded(chain, now, self._advance, chain, states.get(chain.handle), now, done)
            if outcome is not None:
                done.ended[chain] = outcome
            elif chain.waiting and not chain.canceled:
                done.waiting.append(chain)
        return done

    def extend(self, chain: Chain, tasks: Sequence[TaskSpec]) -> Optional[Outcome]:
        """Hand a waiting chain (``Round.waiting``) its next tasks: the first is submitted
        now. Returns the chain's outcome when that ended it (the backend refused the task)."""
        if chain.canceled:
            return None
        chain.tasks.extend(tasks)
        chain.to_come -= 1
        chain.waiting = False
        self._next_task(chain)
        return self._guarded(chain, self.clock(), self._submit, chain)

    def _guarded(self, chain: Chain, now: float, action: Callable[..., Optional[Outcome]],
                 *args) -> Optional[Outcome]:
        """``action`` on ``chain``; what the backend raised ends this chain only, if anything."""
        try:
            outcome = action(*args)
            chain.trouble_since = None
        except NotYet:
            return None  # neither progress nor trouble
        except BackendUnavailable as e:
            if chain.trouble_since is None:
                chain.trouble_since = now
            if now - chain.trouble_since < self.tolerance_s:
                return None
            over = f"{self._wall_time(chain.current)}; " if chain.timed_out else ""
            outcome = self.failed(chain, f"{chain.current.label}: {over}the backend failed ({e})")
        except CrankError as e:
            outcome = self.failed(chain, str(e), e)
        except OSError as e:
            # e.g. a benchmark file that cannot be written: the job fails, the round goes on
            outcome = self.failed(chain, f"{chain.current.label}: {e}")
        if chain.canceled:
            return None  # canceled meanwhile: crank removed it, nothing to report
        return outcome

    def _advance(self, chain: Chain, state: Optional[State], now: float, done: Round) -> Optional[Outcome]:
        if chain.waiting:
            return None
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
        return self._finish_task(chain, state, done)

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

    def _finish_task(self, chain: Chain, state: State, done: Round) -> Optional[Outcome]:
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
        chain.attempts.append(Attempt(task, result, chain.submitted_at, time.time()))
        chain.spent.append(chain.handle)
        chain.handle = None
        chain.submitted_at = None
        if not result.ok:
            return self.failed(chain, failure_message(task, result))
        done.succeeded.setdefault(chain, []).append((task, result))
        if chain.index + 1 == len(chain.tasks):
            if not chain.to_come:
                return Outcome(True, log_files=tuple(chain.log_files), attempts=tuple(chain.attempts))
            # the caller builds the next tasks now, after this success and in this round
            chain.waiting = True
            return None
        self._next_task(chain)
        # a failure here leaves handle None: the next round submits again
        self._submit(chain)
        return None

    @staticmethod
    def _next_task(chain: Chain) -> None:
        chain.index += 1
        chain.running_since = None
        chain.timed_out = chain.stopped = False
        chain.preemptions = chain.interruptions = 0

    def failed(self, chain: Chain, message: str, error: Optional[CrankError] = None) -> Outcome:
        """The outcome of a chain that fails with ``message`` (also when its caller cannot
        build its next tasks)."""
        return Outcome(False, message, tuple(chain.log_files), error, tuple(chain.attempts))

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
