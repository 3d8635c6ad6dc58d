"""The few operations every backend offers. Backends never import Snakemake.

Errors: ``CrankError`` for what the task asks that the backend refuses (a final answer),
``BackendUnavailable`` for a backend that did not answer or answered with a server
error (worth trying again later). Nothing else escapes a backend.
"""

from __future__ import annotations

from typing import Collection, Mapping, Optional, Protocol, Sequence, Tuple

from ..task import Adopted, Capacity, State, TaskResult, TaskSpec


class Backend(Protocol):
    def capacity(self) -> Capacity:
        """The most one task may ask for."""

    def gather_orphans(self, live_runs: Collection[str], dead_runs: Collection[str]) -> Tuple[int, int]:
        """Look at what other runs of this workdir left: never a task of this run or of a
        run in ``live_runs``. The tasks of ``dead_runs`` (they ended without cleaning up)
        that can be adopted are kept for ``adopt``; the rest is canceled. Return (how many
        were canceled, how many are kept)."""

    def adopt(self, task: TaskSpec) -> Optional[Adopted]:
        """A kept task that does this task's work (``adoption.key_of``), now this run's;
        else None, after canceling the kept tasks that write the same files."""

    def cancel_orphans(self) -> int:
        """Cancel the kept tasks nothing adopted; return how many."""

    def submit(self, task: TaskSpec) -> str:
        """Start the task; return its handle. Raises NotYet while what the task needs is
        being made ready (its image pulled) without holding the caller."""

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        """The state of every handle, in one request to the backend."""

    def stop(self, handle: str) -> None:
        """End a running task early, keeping what ``result`` needs."""

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        """Collect a finished task: exit code, reason, logs saved under task.log_dir,
        outputs in place. Keeps what the backend holds for it (see ``release``), so a
        collection that fails can be tried again."""

    def release(self, handles: Sequence[str]) -> None:
        """Free what the backend still holds for collected tasks."""

    def cancel(self, handles: Sequence[str]) -> None:
        """Stop the tasks and free what the backend holds for them."""

    def interrupt(self) -> None:
        """The run is ending (Ctrl-C): drop what moves data now (uploads, downloads, image
        pulls) rather than wait for it; what it was for fails. ``close`` follows."""

    def close(self, detach: bool = False) -> None:
        """Cancel whatever this run still has on the backend (its own tasks and those it
        adopted); with ``detach``, leave every task running for a later run to adopt."""
