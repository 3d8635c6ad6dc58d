"""What crank keeps about one job from ``run_job`` to its outcome, carried in the
job's ``SubmittedJobInfo.aux``: its chain of tasks, the update() outputs backed up
before it, the running time of its tasks, and for a group run job after job, which
of its jobs runs next and which have finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set

from ..errors import CrankError
from ..task import Launch, TaskResult, TaskSpec
from . import guarded, outputs
from .groups import Order
from .group_runs import Flight

if TYPE_CHECKING:
    from ..rounds import Chain


@dataclass(eq=False)
class JobRecord:
    job: Any
    # Snakemake's logger
    info: Callable[[str], None] = lambda line: None
    warn: Callable[[str], None] = lambda line: None
    # how its tasks run (all of them the same way), once they are built
    launch: Optional[Launch] = None
    # its tasks' chain in the status rounds, once started
    chain: Optional["Chain"] = None
    # update() outputs kept before a job that runs directly (put back if it fails)
    backups: List[guarded.Kept] = field(default_factory=list)
    # where its benchmark files go, noted before its tasks run
    places: Dict[str, guarded.Place] = field(default_factory=dict)
    # running time of each task that ran directly, for its job's benchmark file
    seconds: Dict[str, Optional[float]] = field(default_factory=dict)
    # a group run job after job: which job runs next, the jobs finished so far, and the
    # one now running
    order: Optional[Order] = None
    done: Set[Any] = field(default_factory=set)
    member: Any = None
    # a group job's run in flight, which a new submission of the group follows
    flight: Optional[Flight] = None

    @property
    def direct(self) -> bool:
        """Its tasks run its commands directly: crank does what Snakemake does around them."""
        return self.launch is Launch.DIRECT

    @property
    def to_come(self) -> int:
        """How many of the group's jobs are still to start."""
        return self.order.to_come if self.order is not None else 0

    def track(self, tasks: Sequence[TaskSpec]) -> Sequence[TaskSpec]:
        """``tasks`` (those of one job of a group run job after job) start now."""
        if self.job.is_group() and self.direct:
            self.member = next(j for j in self.job.jobs if str(j.jobid) == tasks[-1].job_id)
        return tasks

    def next_tasks(self) -> List[TaskSpec]:
        """The tasks of the group's next job, once those of the job before it succeeded:
        that job is finished first, as the local executor does between two jobs."""
        member = self.member
        self.member_finished()
        missing = outputs.missing_outputs(member) if member is not None else []
        if missing:
            raise CrankError(
                f"rule {member.rule.name} (job {member.jobid}) ended without its output "
                f"{', '.join(missing)}; the rest of group {self.job.groupid} does not run"
            )
        tasks = list(self.track(outputs.make_parents(self.order.next_tasks())))
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
        """One of the job's tasks succeeded (``Round.succeeded``)."""
        if result.reason:
            # e.g. a child killed for lack of memory while the command exited 0
            self.warn(f"crank: {task.label} (job {task.job_id}): {result.reason}")
        if task.launch is Launch.DIRECT:
            self.seconds[task.name] = result.seconds
