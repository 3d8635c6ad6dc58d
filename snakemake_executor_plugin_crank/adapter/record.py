"""What crank keeps about one job from ``run_job`` to its outcome, carried in the
job's ``SubmittedJobInfo.aux``: its chain of tasks, the update() outputs backed up
before it, the running time of its tasks, and for a group run job after job, which
of its jobs have finished."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set

from ..errors import CrankError
from ..task import Launch, TaskResult, TaskSpec
from . import guarded, outputs

if TYPE_CHECKING:
    from ..runner import Chain

# what builds the tasks of a group's later job when it starts
Build = Callable[[], List[TaskSpec]]


@dataclass(eq=False)
class JobRecord:
    job: Any
    # Snakemake's logger
    info: Callable[[str], None] = lambda line: None
    warn: Callable[[str], None] = lambda line: None
    # how its tasks run (all of them the same way), once they are built
    launch: Optional[Launch] = None
    # the job's tasks on the runner, once started
    chain: Optional["Chain"] = None
    # update() outputs kept before a job that runs directly (put back if it fails)
    backups: List[guarded.Kept] = field(default_factory=list)
    # where its benchmark files go, noted before its tasks run
    places: Dict[str, guarded.Place] = field(default_factory=dict)
    # running time of each task that ran directly, for its job's benchmark file
    seconds: Dict[str, Optional[float]] = field(default_factory=dict)
    # a group run job after job: the jobs finished so far, and the one now running
    done: Set[Any] = field(default_factory=set)
    member: Any = None

    @property
    def direct(self) -> bool:
        """Its tasks run its commands directly: crank does what Snakemake does around them."""
        return self.launch is Launch.DIRECT

    def later(self, builds: Sequence[Build]) -> List[Build]:
        """The chain's builders of a group's later jobs (``groups.later_tasks``): each
        first finishes the job before it, then builds its own tasks."""
        return [functools.partial(self._next_member, build) for build in builds]

    def track(self, tasks: Sequence[TaskSpec]) -> Sequence[TaskSpec]:
        """``tasks`` (those of one job of a group run job after job) start now."""
        if self.job.is_group() and self.direct:
            self.member = next(j for j in self.job.jobs if str(j.jobid) == tasks[-1].job_id)
        return tasks

    def _next_member(self, build: Build) -> List[TaskSpec]:
        # before the group's next job starts, as the local executor between two jobs
        member = self.member
        self.member_finished()
        missing = outputs.missing_outputs(member) if member is not None else []
        if missing:
            raise CrankError(
                f"rule {member.rule.name} (job {member.jobid}) ended without its output "
                f"{', '.join(missing)}; the rest of group {self.job.groupid} does not run"
            )
        tasks = list(self.track(outputs.make_parents(build())))
        self.places.update(outputs.benchmark_places(tasks))
        return tasks

    def member_finished(self) -> None:
        """The tasks of the running job of a group have succeeded: its ``touch()``
        outputs are made and the temp files no later job needs go."""
        if self.member is None:
            return
        member, self.member = self.member, None
        self.done.add(member)
        outputs.touch_member_outputs(member)
        consumed = outputs.consumed_temp(self.job, member, self.done)
        outputs.remove_temp(consumed, self.info, self.warn)

    def succeeded(self, task: TaskSpec, result: TaskResult) -> None:
        """One of the job's tasks succeeded (the runner's ``Chain.succeeded``)."""
        if result.reason:
            # e.g. a child killed for lack of memory while the command exited 0
            self.warn(f"crank: {task.label} (job {task.job_id}): {result.reason}")
        if task.launch is Launch.DIRECT:
            self.seconds[task.name] = result.seconds
