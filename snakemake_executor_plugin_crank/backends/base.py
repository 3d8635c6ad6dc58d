"""The few operations every backend offers. Backends never import Snakemake."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from ..resources import Capacity
from ..task import State, TaskResult, TaskSpec


class Backend(Protocol):
    def capacity(self) -> Capacity:
        """The most one task may ask for."""

    def submit(self, task: TaskSpec) -> str:
        """Start the task; return its handle. Raises CrankError for bad input."""

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        """The state of every handle, in one request to the backend."""

    def stop(self, handle: str) -> None:
        """End a running task early, keeping what ``result`` needs."""

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        """Collect a finished task: exit code, reason, logs saved under task.log_dir,
        outputs in place. Releases what the backend still holds for it."""

    def cancel(self, handles: Sequence[str]) -> None:
        """Stop the tasks and release what the backend holds for them."""

    def close(self) -> None:
        """Cancel whatever this run still has on the backend."""
