"""Snakemake job -> TaskSpec.

Two launch modes. A shell: rule runs its formatted command directly in its image; any
other rule (run:, script:, wrapper:, notebook:), and a group holding one, runs Snakemake's
own job command in an image that has Snakemake.

``job.container_img_url``, ``dag.get_sources`` and ``dag.depending`` belong to Snakemake,
not to the plugin interface: that coupling stays in this package. ``groups`` builds the
later jobs of a group run job after job.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from typing import (
    Any, Callable, Collection, Iterable, List, Mapping, Optional, Set, Tuple,
)

from snakemake.io import is_flagged

from .. import limits
from ..errors import CrankError
from ..staging import tree
from ..task import Capacity, Input, Kind, Launch, Output, TaskSpec
from . import command, resources

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

# Snakemake in the image registers the workflow's storage plugins when it reads the Snakefile.
PLUGIN_GUARD = """\
python -c 'import {module}' 2>/dev/null || {{
  echo "crank: image {image} has no {package}, which Snakemake in it needs for the workflow's {name} storage ({label}); install it in the image (pip install {package})" >&2; exit 127; }}
"""


@dataclass(frozen=True)
class JobContext:
    workdir: str
    log_dir: str
    default_image: Optional[str]
    snakemake_image: str = ""
    snakemake_version: str = ""
    job_command: Callable[[Any], str] = lambda job: ""
    sources: Tuple[str, ...] = ()  # absolute paths
    use_conda: bool = False
    envvars: Mapping[str, str] = field(default_factory=dict)
    # job -> the storage plugins' settings (secrets) Snakemake in its image needs
    storage_env: Callable[[Any], Mapping[str, str]] = lambda job: {}
    is_preemptible: Callable[[str], bool] = lambda rule: False
    capacity: Capacity = Capacity()
    clamp: bool = False
    warn: Callable[[str], None] = lambda message: None
    # once per run: note(topic, names) -> the executor prints "topic: names" for new names
    note: Callable[[str, Iterable[str]], None] = lambda topic, names: None
    envmodules: str = "ignore"  # or "fail": a job of a rule with envmodules: and no container:
    # job -> {local path: URL} of its storage inputs the backend fetches itself
    input_urls: Callable[[Any], Mapping[str, str]] = lambda job: {}
    # job -> {local path: URL} of its storage outputs the backend stores itself
    output_urls: Callable[[Any], Mapping[str, str]] = lambda job: {}
    # (name, package) of each storage plugin the workflow uses: Snakemake in an image needs them
    storage_plugins: Tuple[Tuple[str, str], ...] = ()
    # --cores as the user gave it (Snakemake caps job.threads at it); None with only --jobs
    cores: Optional[int] = None


def single_jobs(job: Any) -> List[Any]:
    """The jobs to run, in an order that respects their dependencies."""
    if job.is_group():
        ordered = [j for level in job.toposorted for j in level]
        # Snakemake's group may hold a job twice under one jobid: the job made before a
        # checkpoint it reads and its replacement, which may come first in the order
        # although the checkpoint has not run; the last one runs, after what it reads
        last = {j.jobid: j for j in ordered}
        return [j for j in ordered if last[j.jobid] is j]
    return [job]


def _without_scheme(image: str) -> str:
    """Snakemake's ``docker://`` prefix removed: the engine and TES take the bare reference."""
    return image[len("docker://") :] if image.startswith("docker://") else image


def image_for(job: Any, default_image: Optional[str]) -> str:
    url = job.container_img_url
    if url:
        return _without_scheme(url)
    if default_image:
        return default_image
    raise CrankError(
        f"rule {job.rule.name} has no container: image and no default is set; "
        "add container: to the rule or pass --crank-default-image"
    )


def image_source(job: Any, ctx: "JobContext") -> str:
    """Where the image of a job's tasks came from, for messages about it."""
    if not job.is_group() and job.container_img_url:
        return f"the container: image of rule {job.rule.name}"
    if not runs_concurrently(job) and all(runs_directly(j, ctx) for j in single_jobs(job)):
        return "--crank-default-image (or --container-image)"
    return "--container-image (the image with Snakemake)"


def task_env(threads: int, envvars: Mapping[str, str]) -> Mapping[str, str]:
    env = {name: str(threads) for name in THREAD_VARIABLES}
    env.update(TMPDIR=CONTAINER_TMPDIR, TMP=CONTAINER_TMPDIR, TEMP=CONTAINER_TMPDIR)
    env.update(envvars)
    return env


def _inputs(paths: Iterable[Any], urls: Mapping[str, str] = {}, made: Collection[str] = ()) -> Tuple[Input, ...]:
    """``made``: the outputs of the jobs of the task (a group's pipe() outputs are FIFOs its
    own jobs make and read)."""
    found = []
    for path in map(os.path.abspath, map(str, paths)):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0  # not there (yet)
        what = None if not mode or path in urls or path in made else tree.special(mode)
        if what:
            # a job would wait on it for ever; the local executor too
            raise CrankError(f"input {path} is {what}, not a file or directory a job can be given; "
                             "give the job a regular file instead")
        kind = Kind.DIRECTORY if stat.S_ISDIR(mode) else Kind.FILE
        found.append(Input(path, kind, url=urls.get(path)))
    return tuple(found)


def _outputs(files: Iterable[Any], read_later: Collection[str] = (),
             urls: Mapping[str, str] = {}) -> Tuple[Output, ...]:
    found = []
    for f in files:
        path = os.path.abspath(str(f))
        kind = Kind.DIRECTORY if is_flagged(f, "directory") else Kind.FILE
        found.append(Output(path, kind, read_later=path in read_later,
                            update=is_flagged(f, "update"), url=urls.get(path)))
    return tuple(found)


def _read_later(jobs: Collection[Any]) -> Set[str]:
    """The outputs of ``jobs`` that a task of the run outside them reads (a local job,
    such as a target rule, reads them on the host)."""
    return {
        os.path.abspath(str(f))
        for job in jobs
        for consumer, files in job.dag.depending.get(job, {}).items()
        if consumer not in jobs and not consumer.is_local
        for f in files
    }


def _benchmarks(jobs: Iterable[Any]) -> Tuple[str, ...]:
    return tuple(os.path.abspath(str(j.benchmark)) for j in jobs if j.benchmark)


def _task_name(*parts: Any) -> str:
    # a file name and a Docker container name: group names may hold anything
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(str(p) for p in parts))


IGNORED_NOTE = "ignored resources with no meaning in a container"
ENVMODULES_NOTE = (
    "envmodules: are ignored in containers (no environment modules there); give these rules "
    "a container: image with their tools, or pass --crank-envmodules fail to stop instead"
)


def _envmodules(job: Any, ctx: JobContext) -> None:
    if not job.env_modules or job.container_img_url:
        return
    if ctx.envmodules == "fail":
        raise CrankError(
            f"rule {job.rule.name} has envmodules: and no container:, and a container has no "
            "environment modules; give it a container: image with its tools "
            "(--crank-envmodules fail is set)"
        )
    ctx.note(ENVMODULES_NOTE, [f"rule {job.rule.name}"])


def ignored_resources(workflow: Any) -> List[str]:
    """The resources with no meaning in a container that the workflow's rules set
    (defaults, profile and --set-resources included), to report once when a run starts."""
    return resources.ignored_names(name for rule in workflow.rules for name in rule.resources)


def _resources(label: str, job: Any, preemptible: bool, ctx: JobContext) -> resources.Resources:
    mapped = resources.map_job(label, job.threads, job.resources, preemptible)
    ctx.note(IGNORED_NOTE, mapped.ignored)
    res, warnings = limits.fit(
        label, mapped.resources, ctx.capacity, ctx.clamp, mapped.mem_mb_per_cpu
    )
    for warning in (*mapped.warnings, *warnings):
        ctx.warn(warning)
    return res


def shell_tasks(job: Any, ctx: JobContext) -> List[TaskSpec]:
    """The command Snakemake would execute for the job (see ``command``), run directly:
    one task, or one per repeat of ``benchmark: repeat(..., n)`` (each with its own
    ``bench_iteration``), as Snakemake runs the command n times. Raises
    command.NotPlainShell when the rule is not one plain shell call."""
    rule = job.rule.name
    repeats = max(1, job.benchmark_repeats or 1) if job.benchmark else 1
    # Snakemake passes bench_iteration 0..n-1 when benchmarking, else None
    iterations = range(repeats) if job.benchmark else [None]
    res = _resources(f"rule {rule}", job, ctx.is_preemptible(rule), ctx)
    threads = _threads(job, res, ctx)
    scripts = [
        command.script_for(command.record(job, CONTAINER_TMPDIR, threads, i))
        for i in iterations
    ]
    suffixes = [()] if repeats == 1 else [(f"b{i}",) for i in range(repeats)]
    return [
        _shell_task(job, ctx, rule, script, res, threads, suffix)
        for script, suffix in zip(scripts, suffixes)
    ]


def _threads(job: Any, res: resources.Resources, ctx: JobContext) -> int:
    """``{threads}`` and the thread variables, as the local executor gives them: the
    rule's threads capped at --cores when the user gave it (Snakemake has done so in
    ``job.threads``), else at the CPUs the task gets (``threads: 0`` stays 0, as
    locally). The task's CPU limit stays within the backend's CPUs either way."""
    return job.threads if ctx.cores else min(job.threads, res.cpus)


def _shell_task(job, ctx, rule, script, res, threads, suffix) -> TaskSpec:
    return TaskSpec(
        name=_task_name(rule, job.jobid, job.attempt, *suffix),
        label=f"rule {rule}",
        job_id=str(job.jobid),
        attempt=job.attempt,
        image=image_for(job, ctx.default_image),
        script=script,
        workdir=ctx.workdir,
        env=task_env(threads, ctx.envvars),
        inputs=_inputs(job.input, ctx.input_urls(job)),
        outputs=_outputs(job.output, _read_later([job]), ctx.output_urls(job)),
        logs=_outputs(job.log),
        benchmarks=_benchmarks([job]),
        launch=Launch.DIRECT,
        resources=res,
        log_dir=ctx.log_dir,
        sources=ctx.sources,
    )


# memory added to the limit of a pipe() or service() group for Snakemake's own process
SNAKEMAKE_MEM_MB = 200

GROUP_IMAGE_NOTE = (
    "these rules run in a group that Snakemake runs as a whole in --container-image (a group "
    "with pipe() or service() outputs, or with a rule that needs Snakemake), not in their own image"
)


def _group_image_note(job: Any, ctx: JobContext) -> None:
    """One line per run naming the group members whose own image is not used."""
    moved = set()
    for single in job.jobs:
        own = _without_scheme(single.container_img_url or ctx.default_image or "")
        if own and own != ctx.snakemake_image:
            moved.add(f"rule {single.rule.name} (not {own})")
    ctx.note(GROUP_IMAGE_NOTE, moved)


def snakemake_task(job: Any, ctx: JobContext) -> TaskSpec:
    """The whole job (or group) as Snakemake's own job command, run inside the image."""
    singles = single_jobs(job)
    if job.is_group():
        label, name = f"group {job.groupid}", job.groupid
        image = ctx.snakemake_image
        _group_image_note(job, ctx)
    else:
        label, name = f"rule {job.rule.name}", job.rule.name
        image = image_for(job, ctx.snakemake_image)
    preemptible = all(ctx.is_preemptible(j.rule.name) for j in singles)
    res = _resources(label, job, preemptible, ctx)
    if runs_concurrently(job) and res.mem_mb:
        # crank, not the user, chose to run these shell: rules through Snakemake: its own
        # process (about 100 MB) must not eat the memory the rules asked for
        mem_mb = res.mem_mb + SNAKEMAKE_MEM_MB
        if ctx.capacity.mem_mb:
            mem_mb = min(mem_mb, ctx.capacity.mem_mb)
        res = dataclasses.replace(res, mem_mb=mem_mb)
    major = ctx.snakemake_version.split(".")[0]
    guard = SNAKEMAKE_GUARD.format(
        image=image, label=label, version=ctx.snakemake_version, major=major
    ) + "".join(
        PLUGIN_GUARD.format(
            module=package.replace("-", "_"), package=package, name=name, image=image,
            label=label,
        )
        for name, package in ctx.storage_plugins
    )
    return TaskSpec(
        name=_task_name(name, job.jobid, job.attempt),
        label=label,
        job_id=str(job.jobid),
        attempt=job.attempt,
        image=image,
        script=guard + _with_shadow_prefix(ctx.job_command(job), singles, ctx.workdir),
        workdir=ctx.workdir,
        env={
            **task_env(_threads(job, res, ctx), ctx.envvars),
            **ctx.storage_env(job),
            # Snakemake writes caches under $HOME, which an unknown uid lacks
            "HOME": CONTAINER_TMPDIR,
        },
        inputs=_inputs([*(f for j in singles for f in j.input), *ctx.sources],
                       made={os.path.abspath(str(f)) for j in singles for f in j.output}),
        outputs=_outputs((f for j in singles for f in j.output), _read_later(singles)),
        logs=_outputs(f for j in singles for f in j.log),
        # Snakemake in the image measures and writes them
        benchmarks=_benchmarks(singles),
        resources=res,
        log_dir=ctx.log_dir,
    )


def _with_shadow_prefix(command: str, jobs: Iterable[Any], workdir: str) -> str:
    """Snakemake without a shared file system keeps its shadow directories in a temporary
    directory; a shadow rule's links to its inputs (relative ones under ``minimal``) would
    then have another text than under the local executor, and a link the job copies to an
    output another target. In the workdir's .snakemake, as locally, unless the user chose."""
    if "--shadow-prefix" in command or not any(j.is_shadow for j in jobs):
        return command
    return f"{command} --shadow-prefix {shlex.quote(os.path.join(workdir, '.snakemake'))}"


def runs_directly(job: Any, ctx: JobContext) -> bool:
    """A shell: rule runs directly in its image, unless Snakemake must prepare a shadow
    directory or deploy a conda environment around it."""
    return (
        job.is_shell
        and not job.is_shadow
        and not (ctx.use_conda and job.conda_env_spec)
    )


def runs_concurrently(job: Any) -> bool:
    """A group whose jobs must run at the same time: a pipe() output is a FIFO its
    consumer reads while the producer writes, a service() job serves its consumers until
    they finish. Snakemake in the image runs such a group as it does locally."""
    return job.is_group() and any(
        is_flagged(f, "pipe") or is_flagged(f, "service")
        for j in job.jobs
        for f in j.output
    )


def tasks_for(job: Any, ctx: JobContext) -> List[TaskSpec]:
    """The tasks that start now: the job's, or for a group whose jobs run directly one
    after another, its first job's (``groups.Order`` builds the others')."""
    singles = single_jobs(job)
    for single in singles:
        _envmodules(single, ctx)
    if not runs_concurrently(job) and all(runs_directly(j, ctx) for j in singles):
        try:
            return shell_tasks(singles[0], ctx)
        except command.NotPlainShell:
            pass  # Snakemake in the image runs it as it would locally
    return [snakemake_task(job, ctx)]


def snakemake_version() -> str:
    from snakemake import __version__

    return __version__


def workflow_sources(workflow: Any) -> Tuple[str, ...]:
    """The Snakefiles, scripts, notebooks, config and environment files, a local wrapper
    prefix, and in a git checkout the tracked files, that a job may read (absolute)."""
    sources = [*workflow.dag.get_sources(), *workflow.configfiles]
    prefix = workflow.workflow_settings.wrapper_prefix or ""
    if prefix.startswith("file://"):
        sources.append(prefix[len("file://") :])
    return tuple(dict.fromkeys(os.path.abspath(str(s)) for s in sources))
