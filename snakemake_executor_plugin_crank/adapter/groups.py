"""A group that crank runs job after job (all its jobs run directly): which of its later
jobs runs next, and its tasks, built when it starts, once the jobs before it have finished.

A job's ``_params_and_resources_resetted``, ``dependencies`` and ``Job`` itself belong to
Snakemake, not to the plugin interface: that coupling stays in ``adapter/``.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence

from snakemake.io import is_flagged
from snakemake.jobs import Job

from ..errors import CrankError
from ..task import Launch, TaskSpec
from . import command
from .jobs import JobContext, shell_tasks, single_jobs


def order(job: Any, launch: Launch, ctx: JobContext) -> Optional["Order"]:
    """For a group whose jobs run directly (``launch``), once its first job's tasks are
    built (``tasks_for``): which of its later jobs runs next, each built when it starts.
    None for any other job."""
    if not job.is_group() or launch is not Launch.DIRECT:
        return None
    members = single_jobs(job)
    return Order(members[0], members[1:], ctx)


class Order:
    """Which of a group's jobs runs next, and its tasks, built once the jobs before it
    have finished. Snakemake evaluated their params and resources when it scheduled the
    group, before the files they read existed (``input.size`` of a file still to be made is
    ``<TBD>``); the local executor evaluates them when the job is ready.

    A job that reads a checkpoint of its group was made before the checkpoint ran: its
    input is the checkpoint's output, not what its input function returns. Once the
    checkpoint has run, the local executor (and Snakemake running a whole group in one
    process for its remote executors) makes the job anew
    (``Dag.update_checkpoint_dependencies``) and runs it once the jobs it now reads have
    finished: so does this, before the job's tasks are built."""

    def __init__(self, first: Any, pending: Sequence[Any], ctx: JobContext):
        self.finished = [first]  # started so far: all have finished when ``next_tasks`` runs
        self.pending = list(pending)
        self.ctx = ctx

    @property
    def to_come(self) -> int:
        return len(self.pending)

    def next_tasks(self) -> List[TaskSpec]:
        """The tasks of the next job, once every job started so far has finished."""
        return _outside_event_loop(self._next_tasks)

    def _next_tasks(self) -> List[TaskSpec]:
        for member in self.pending:
            _read_checkpoints(member, self.finished)
        waiting = {
            member: {f for other in self.pending if other is not member for f in other.output}
            for member in self.pending
        }
        # the first in Snakemake's order that reads nothing a job still to run makes
        member = next(
            (m for m in self.pending if waiting[m].isdisjoint(m.input)), self.pending[0]
        )
        self.pending.remove(member)
        self.finished.append(member)
        return _member_tasks(member, self.ctx)


def _read_checkpoints(job: Any, finished: Sequence[Any]) -> None:
    """``job`` takes the input (and the input functions' dependencies) its rule gives once
    the checkpoints among ``finished`` have run, if it read one of them before."""
    if not any(is_flagged(f, "checkpoint_target") for f in job.input):
        return
    created = job.dag.workflow.checkpoints.created_output
    # counted as created only while the job is made: Snakemake counts them once the whole
    # group has succeeded (never if it failed: their outputs are removed)
    ran = {f for j in finished if j.is_checkpoint for f in j.output} - set(created)
    if not ran:
        return
    created.update(ran)
    try:
        group = job.dag.get_job_group(job)
        again = Job(
            job.rule, job.dag, job.wildcards_dict, targetfile=job.targetfile,
            groupid=group.jobid if group is not None else None,
        )
    except Exception as e:  # an input function's error, in Snakemake's words
        raise CrankError(
            f"rule {job.rule.name}: cannot evaluate its input after its checkpoint: {_one_line(e)}"
        ) from None
    finally:
        created.difference_update(ran)
    job.input, job.dependencies = again.input, again.dependencies
    job.incomplete_input_expand = again.incomplete_input_expand


@functools.lru_cache(maxsize=None)
def _evaluator() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="crank-evaluate")


def _outside_event_loop(func: Callable[..., Any], *args: Any) -> Any:
    """Snakemake evaluates ``input.size`` and the like in an event loop of its own, which
    cannot run inside the running one of Snakemake's status checks (the value would be
    ``<TBD>``): ``func`` runs in a thread of crank's, one for the whole run, so that
    Snakemake keeps one event loop for it."""
    return _evaluator().submit(func, *args).result()


def _member_tasks(job: Any, ctx: JobContext) -> List[TaskSpec]:
    # Snakemake resets them once, when the scheduler first finds the job ready
    job._params_and_resources_resetted = False
    job.reset_params_and_resources()
    try:
        job.params, job.resources
    except Exception as e:  # an input function's or a resource's error, in Snakemake's words
        raise CrankError(
            f"rule {job.rule.name}: cannot evaluate its params or resources: {_one_line(e)}"
        ) from None
    try:
        return shell_tasks(job, ctx)
    except command.NotPlainShell:
        raise CrankError(
            f"rule {job.rule.name}: its shell: function does not make exactly one shell "
            "call, so it cannot run directly in its group"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
