"""Snakemake job -> TaskSpec. The only module that reads Snakemake's job objects.

Two launch modes. A shell: rule runs its formatted command directly in its image; any
other rule (run:, script:, wrapper:, notebook:), and a group holding one, runs Snakemake's
own job command in an image that has Snakemake.

``job.shellcmd``, ``job.container_img_url``, ``job.remove_existing_output`` and
``dag.get_sources`` belong to Snakemake, not to the plugin interface: that coupling stays
here.
"""

from __future__ import annotations

import os
import re
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

# Fails the task with one clear line when the image cannot run Snakemake's job command.
SNAKEMAKE_GUARD = """\
crank_found=$(python -c 'import snakemake; print(snakemake.__version__)' 2>/dev/null) || {{
  echo "crank: image {image} has no Snakemake (python -m snakemake); {label} needs an image with Snakemake {version}: pass one with --container-image" >&2; exit 127; }}
case "$crank_found" in {major}.*) ;; *)
  echo "crank: image {image} has Snakemake $crank_found but this run uses {version}; pass an image with Snakemake {major}.x with --container-image" >&2; exit 127;; esac
"""


@dataclass(frozen=True)
class JobContext:
    workdir: str
    log_dir: str
    default_image: Optional[str]
    snakemake_image: str = ""
    snakemake_version: str = ""
    job_command: Callable[[Any], str] = lambda job: ""
    sources: Iterable[str] = ()
    use_conda: bool = False
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


def _outputs(jobs: Iterable[Any]) -> tuple:
    return _absolute(
        path
        for job in jobs
        for path in [*job.output, *job.log, *([job.benchmark] if job.benchmark else [])]
    )


def _task_name(*parts: Any) -> str:
    # a file name and a Docker container name: group names may hold anything
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(str(p) for p in parts))


def _resources(label: str, job: Any, preemptible: bool, ctx: JobContext) -> resources.Resources:
    wanted = resources.from_snakemake(label, job.threads, job.resources, preemptible)
    res, warnings = resources.fit(label, wanted, ctx.capacity, ctx.clamp)
    for warning in warnings:
        ctx.warn(warning)
    return res


def shell_task(job: Any, ctx: JobContext) -> TaskSpec:
    rule = job.rule.name
    res = _resources(f"rule {rule}", job, ctx.is_preemptible(rule), ctx)
    return TaskSpec(
        name=_task_name(rule, job.jobid, job.attempt),
        label=f"rule {rule}",
        job_id=str(job.jobid),
        attempt=job.attempt,
        image=image_for(job, ctx.default_image),
        script=job.shellcmd,
        workdir=ctx.workdir,
        env=task_env(res.cpus, ctx.envvars),
        inputs=_absolute(job.input),
        outputs=_outputs([job]),
        resources=res,
        log_dir=ctx.log_dir,
        benchmark=os.path.abspath(job.benchmark) if job.benchmark else None,
    )


def snakemake_task(job: Any, ctx: JobContext) -> TaskSpec:
    """The whole job (or group) as Snakemake's own job command, run inside the image."""
    singles = single_jobs(job)
    if job.is_group():
        label, name = f"group {job.groupid}", job.groupid
        image = ctx.snakemake_image
    else:
        label, name = f"rule {job.rule.name}", job.rule.name
        image = image_for(job, ctx.snakemake_image)
    preemptible = all(ctx.is_preemptible(j.rule.name) for j in singles)
    res = _resources(label, job, preemptible, ctx)
    major = ctx.snakemake_version.split(".")[0]
    guard = SNAKEMAKE_GUARD.format(
        image=image, label=label, version=ctx.snakemake_version, major=major
    )
    return TaskSpec(
        name=_task_name(name, job.jobid, job.attempt),
        label=label,
        job_id=str(job.jobid),
        attempt=job.attempt,
        image=image,
        script=guard + ctx.job_command(job),
        workdir=ctx.workdir,
        # Snakemake writes caches under $HOME, which an unknown uid lacks
        env={**task_env(res.cpus, ctx.envvars), "HOME": CONTAINER_TMPDIR},
        inputs=_absolute([*(f for j in singles for f in j.input), *ctx.sources]),
        outputs=_outputs(singles),
        resources=res,
        log_dir=ctx.log_dir,
    )


def runs_directly(job: Any, ctx: JobContext) -> bool:
    """A shell: rule runs directly in its image, unless Snakemake must prepare a shadow
    directory or deploy a conda environment around it."""
    return (
        job.is_shell
        and not job.is_shadow
        and not (ctx.use_conda and job.conda_env_spec)
    )


def tasks_for(job: Any, ctx: JobContext) -> List[TaskSpec]:
    singles = single_jobs(job)
    if all(runs_directly(j, ctx) for j in singles):
        return [shell_task(j, ctx) for j in singles]
    return [snakemake_task(job, ctx)]


def snakemake_version() -> str:
    from snakemake import __version__

    return __version__


def workflow_sources(workflow: Any) -> List[str]:
    """The Snakefiles, scripts, notebooks, config and environment files, and a local
    wrapper prefix, that a job may read."""
    sources = [*workflow.dag.get_sources(), *workflow.configfiles]
    prefix = workflow.workflow_settings.wrapper_prefix or ""
    if prefix.startswith("file://"):
        sources.append(prefix[len("file://") :])
    return sources


def write_benchmark(path: str, seconds: Optional[float]) -> None:
    """A benchmark file in Snakemake's format with the running time (the other columns,
    measured by Snakemake around a local process, are NA)."""
    from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

    record = BenchmarkRecord(running_time=seconds)
    record.process_gone = True  # nothing was sampled: NA without a warning
    write_benchmark_records([record], path, extended_fmt=False)


def prepare_outputs(job: Any, async_run: Callable) -> None:
    """Remove stale outputs, as Snakemake's local executor does before a job; remote
    executors must do it themselves."""
    async_run(job.remove_existing_output())
