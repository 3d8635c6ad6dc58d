"""A group that crank runs job after job (all its jobs run directly): the tasks of its
later jobs, built when each starts, once the jobs before it have finished.

A job's ``_params_and_resources_resetted`` belongs to Snakemake, not to the plugin
interface: that coupling stays in ``adapter/``.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Sequence

from ..errors import CrankError
from ..task import TaskSpec
from . import command
from .jobs import JobContext, shell_tasks, single_jobs


def later_tasks(
    job: Any, first: Sequence[TaskSpec], ctx: JobContext
) -> List[Callable[[], List[TaskSpec]]]:
    """For a group whose jobs run directly, after ``first`` (``tasks_for``): for each
    later job, what builds its tasks when it starts, once the jobs before it have
    finished. Snakemake evaluated their params and resources when it scheduled the group,
    before the files they read existed (``input.size`` of a file still to be made is
    ``<TBD>``); the local executor evaluates them when the job is ready."""
    if not job.is_group() or not all(t.benchmarks_by_crank for t in first):
        return []
    return [
        functools.partial(_outside_event_loop, _member_tasks, single, ctx)
        for single in single_jobs(job)[1:]
    ]


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
        message = " ".join(str(e).split()) or type(e).__name__
        raise CrankError(
            f"rule {job.rule.name}: cannot evaluate its params or resources: {message}"
        ) from None
    try:
        return shell_tasks(job, ctx)
    except command.NotPlainShell:
        raise CrankError(
            f"rule {job.rule.name}: its shell: function does not make exactly one shell "
            "call, so it cannot run directly in its group"
        ) from None
