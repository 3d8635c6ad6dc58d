"""Drives tasks on a backend: one status request per round for every active task,
wall-time limits, group chains, and the message a failure is reported with."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .backends.base import Backend
from .task import CrankError, State, TaskResult, TaskSpec


@dataclass(eq=False)
class Chain:
    """The tasks of one Snakemake job (several for a group job), run one after another."""

    tasks: Tuple[TaskSpec, ...]
    index: int = 0
    handle: Optional[str] = None
    running_since: Optional[float] = None
    timed_out: bool = False
    log_files: List[str] = field(default_factory=list)

    @property
    def current(self) -> TaskSpec:
        return self.tasks[self.index]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""
    log_files: Tuple[str, ...] = ()


def failure_message(task: TaskSpec, result: TaskResult) -> str:
    what = f"{task.label} (job {task.job_id}, attempt {task.attempt}) failed in image {task.image}"
    details = []
    if result.exit_code is not None:
        details.append(f"exit code {result.exit_code}")
    if result.reason:
        details.append(result.reason)
    message = what + (": " + "; ".join(details) if details else "")
    if result.stderr_tail.strip():
        message += "\nlast lines of stderr:\n" + result.stderr_tail.rstrip()
    return message + "\n"


class Runner:
    def __init__(
        self,
        backend: Backend,
        on_success: Callable[[TaskSpec, TaskResult], None] = lambda task, result: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend
        self.on_success = on_success
        self.clock = clock

    def start(self, tasks: Sequence[TaskSpec]) -> Chain:
        chain = Chain(tuple(tasks))
        chain.handle = self.backend.submit(chain.current)
        return chain

    def step(self, chains: Sequence[Chain]) -> Dict[Chain, Outcome]:
        """Advance every chain by what happened since the last round; return the
        outcome of each chain that ended."""
        if not chains:
            return {}
        states = self.backend.poll([c.handle for c in chains])
        now = self.clock()
        ended: Dict[Chain, Outcome] = {}
        for chain in chains:
            state = states[chain.handle]
            if state is State.RUNNING:
                self._enforce_wall_time(chain, now)
            elif state.terminal:
                outcome = self._finish_task(chain)
                if outcome is not None:
                    ended[chain] = outcome
        return ended

    def _enforce_wall_time(self, chain: Chain, now: float) -> None:
        if chain.running_since is None:
            chain.running_since = now
        limit = chain.current.resources.runtime_s
        if limit and not chain.timed_out and now - chain.running_since > limit:
            chain.timed_out = True
            self.backend.stop(chain.handle)

    def _finish_task(self, chain: Chain) -> Optional[Outcome]:
        task = chain.current
        result = self.backend.result(chain.handle, task)
        if chain.timed_out:
            limit = task.resources.runtime_s // 60
            result = dataclasses.replace(
                result, ok=False, reason=f"wall time exceeded (runtime limit {limit} min)"
            )
        chain.log_files.extend(result.log_files)
        logs = tuple(chain.log_files)
        if not result.ok:
            return Outcome(False, failure_message(task, result), logs)
        self.on_success(task, result)
        if chain.index + 1 == len(chain.tasks):
            return Outcome(True, log_files=logs)
        chain.index += 1
        chain.running_since = None
        chain.timed_out = False
        try:
            chain.handle = self.backend.submit(chain.current)
        except CrankError as e:
            chain.handle = None
            return Outcome(False, f"{e}\n", logs)
        return None

    def cancel(self, chains: Sequence[Chain]) -> None:
        self.backend.cancel([c.handle for c in chains if c.handle])

    @staticmethod
    def next_interval(chains: Sequence[Chain], now: float, ceiling: float) -> float:
        """Poll often while tasks are young (short jobs end fast), less as they age."""
        ages = [now - c.running_since for c in chains if c.running_since is not None]
        youngest = min(ages, default=0.0)
        return max(0.1, min(ceiling, youngest / 10))

