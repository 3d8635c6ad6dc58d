"""The TES task crank makes of a TaskSpec (its body, resources and tags), and what TES's
states mean to crank."""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import tes

from ...errors import CrankError
from ...staging.staged import Staged
from ...task import State, TaskSpec
from . import layout, script
from .monitor import LISTED_STATES

TAG_RUN = "crank-run"
TAG_JOB = "crank-job"
TAG_RULE = "crank-rule"
TAG_WORKDIR = "crank-workdir"
TAG_ORIGIN = "crank-origin"  # runs.origin: tells apart two workdirs at the same path
TAG_SUBMISSION = "crank-submission"
# what the task does (adoption.key_of) and which files it writes: a later run adopts it
TAG_KEY = "crank-key"
TAG_PRODUCTS = "crank-products"

STATES = {
    "UNKNOWN": State.QUEUED,
    "QUEUED": State.QUEUED,
    "INITIALIZING": State.QUEUED,
    "RUNNING": State.RUNNING,
    "PAUSED": State.RUNNING,
    "COMPLETE": State.FINISHED,
    "EXECUTOR_ERROR": State.FINISHED,
    "SYSTEM_ERROR": State.FINISHED,
    "CANCELED": State.CANCELED,
    "CANCELING": State.CANCELED,
    "PREEMPTED": State.PREEMPTED,
}
NON_TERMINAL = ("UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "PAUSED")
# a dead run's task that ended in these is adopted with its outcome (a system error or a
# cancel is not the job's: a new task runs)
ADOPTABLE_ENDS = ("COMPLETE", "EXECUTOR_ERROR")
# what a run's end lists to cancel what is left: the states a status round lists, and PAUSED
# (UNKNOWN, the enum's zero, would filter nothing)
CLOSE_STATES = (*LISTED_STATES, "PAUSED")


def workdir_tag(workdir: str) -> str:
    return hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


def resources_of(task: TaskSpec) -> tes.Resources:
    """Exact mapping: decimal MB to GB, never rounded up; GPUs as backend parameters."""
    r = task.resources
    params = {"gpus": str(r.gpus)} if r.gpus else {}
    if r.gpus and r.gpu_model:
        params["gpu_model"] = r.gpu_model
    return tes.Resources(
        cpu_cores=r.cpus,
        ram_gb=r.mem_mb / 1000 if r.mem_mb else None,
        disk_gb=r.disk_mb / 1000 if r.disk_mb else None,
        preemptible=True if r.preemptible else None,
        backend_parameters=params or None,
    )


def to_tes_task(
    task: TaskSpec, staged: Sequence[Staged], out_url: str, tags: Mapping[str, str],
    source_set: Optional[Tuple[str, str]] = None,
) -> tes.Task:
    """The TES task for ``task`` whose inputs are ``staged``; products go to ``out_url``;
    ``source_set``: (digest, URL) of the archive of the workflow's sources (``script``). Each
    input the server fetches goes straight to its own path, inside the writable volumes."""
    inputs, seen = [], set()
    for s in staged:
        if not s.fetched or s.path in seen:
            continue
        seen.add(s.path)
        inputs.append(tes.Input(url=s.url, path=s.path, type="DIRECTORY" if s.remote_dir else "FILE"))
    volumes = layout.volumes(
        layout.needed_dirs(task, staged) + (layout.source_dirs(task) if source_set else [])
    )
    text = script.wrapper_script(task, staged, volumes, source_set[0] if source_set else "")
    if source_set:
        inputs.append(tes.Input(url=source_set[1], path=f"{layout.IN}/{source_set[0]}", type="FILE"))
    inputs.append(tes.Input(path=layout.WRAPPER, content=text, type="FILE"))
    inputs.append(tes.Input(path=layout.COMMAND, content=task.script, type="FILE"))
    inputs.append(tes.Input(path=layout.PLACED, content=script.placed_list(task, staged), type="FILE"))
    executor = tes.Executor(
        image=task.image,
        command=["/bin/sh", layout.WRAPPER],
        stdout=layout.STDOUT,
        stderr=layout.STDERR,
        env=dict(task.env) or None,
    )
    return tes.Task(
        name=task.name,
        description=f"crank: {task.label} (job {task.job_id}, attempt {task.attempt})",
        inputs=inputs,
        outputs=[tes.Output(path=layout.OUT, url=out_url, type="DIRECTORY")] + [
            # straight to its object, never through crank's store
            tes.Output(path=layout.upload_dir(n), url=layout.url_parent(p.url)[0], type="DIRECTORY")
            for n, p in enumerate(task.products) if p.url
        ],
        resources=resources_of(task),
        executors=[executor],
        volumes=volumes,
        tags=dict(tags),
    )


def task_body(t: tes.Task) -> Dict[str, Any]:
    ok, error = t.is_valid()
    if not ok:
        raise CrankError(f"crank built an invalid TES task: {error}")
    return t.as_dict()


def executor_start(t: tes.Task) -> Optional[float]:
    """When the task's latest attempt started its command (wall clock), as a BASIC or FULL
    view tells; None before that. A time without a zone is UTC (RFC 3339 requires one)."""
    if not t.logs:
        return None
    started = next((e.start_time for e in t.logs[-1].logs or [] if e.start_time), None)
    if started is None:
        return None
    return (started if started.tzinfo else started.replace(tzinfo=datetime.timezone.utc)).timestamp()
