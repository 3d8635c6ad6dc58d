"""Snakemake job -> TaskSpec. The only module that reads Snakemake's job objects.

``job.shellcmd``, ``job.container_img_url`` and ``job.remove_existing_output`` belong to
Snakemake's ``Job``, not to the plugin interface: that coupling stays here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Mapping, Optional

from . import resources
from .resources import Capacity
from .task import CrankError, TaskSpec

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

CONTAINER_TMPDIR = "/tmp"


@dataclass(frozen=True)
class JobContext:
    workdir: str
    log_dir: str
    default_image: Optional[str]
    envvars: Mapping[str, str] = field(default_factory=dict)
    is_preemptible: Callable[[str], bool] = lambda rule: False
    capacity: Capacity = Capacity()
    clamp: bool = False
    warn: Callable[[str], None] = lambda message: None


def single_jobs(job: Any) -> List[Any]:
    """The jobs to run, in an order that respects their dependencies."""
    if job.is_group():
        return [j for level in job.toposorted for j in level]
    return [job]


def rule_kind(job: Any) -> str:
    for kind in ("shell", "script", "wrapper", "notebook", "cwl", "template_engine"):
        if getattr(job, f"is_{kind}"):
            return kind
    return "norun" if job.is_norun else "run"


def image_for(job: Any, default_image: Optional[str]) -> str:
    url = job.container_img_url
    if url:
        return url[len("docker://") :] if url.startswith("docker://") else url
    if default_image:
        return default_image
    raise CrankError(
        f"rule {job.rule.name} has no container: image and no default is set; "
        "add container: to the rule or pass --crank-default-image"
    )


def task_env(threads: int, envvars: Mapping[str, str]) -> Mapping[str, str]:
    env = {name: str(threads) for name in THREAD_VARIABLES}
    env.update(TMPDIR=CONTAINER_TMPDIR, TMP=CONTAINER_TMPDIR, TEMP=CONTAINER_TMPDIR)
    env.update(envvars)
    return env


def _absolute(paths: Iterable[Any]) -> tuple:
    return tuple(os.path.abspath(str(p)) for p in paths)


def task_for(job: Any, ctx: JobContext) -> TaskSpec:
    rule = job.rule.name
    kind = rule_kind(job)
    if kind != "shell":
        raise CrankError(
            f"rule {rule} is a {kind}: rule; crank runs shell: rules only so far "
            "(use a shell: rule, or run this rule with another executor)"
        )
    outputs = list(job.output) + list(job.log) + ([job.benchmark] if job.benchmark else [])
    wanted = resources.from_snakemake(
        rule, job.threads, job.resources, ctx.is_preemptible(rule)
    )
    res, warnings = resources.fit(rule, wanted, ctx.capacity, ctx.clamp)
    for warning in warnings:
        ctx.warn(warning)
    return TaskSpec(
        name=f"{rule}-{job.jobid}-{job.attempt}",
        rule=rule,
        job_id=job.jobid,
        attempt=job.attempt,
        image=image_for(job, ctx.default_image),
        script=job.shellcmd,
        workdir=ctx.workdir,
        env=task_env(res.cpus, ctx.envvars),
        inputs=_absolute(job.input),
        outputs=_absolute(outputs),
        resources=res,
        log_dir=ctx.log_dir,
    )


def tasks_for(job: Any, ctx: JobContext) -> List[TaskSpec]:
    return [task_for(j, ctx) for j in single_jobs(job)]


def prepare_outputs(job: Any, async_run: Callable) -> None:
    """Remove stale outputs, as Snakemake's local executor does before a job; remote
    executors must do it themselves."""
    async_run(job.remove_existing_output())
