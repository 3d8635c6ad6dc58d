"""Warm tasks a dead run left running, taken over by a later run.

An exec has no labels, so before its start the pool writes what a later run needs into
the runner's directory on the host (``RECORD``: the task's adoption key, which files it
writes, its name and the exec's id); it is removed once the task's end is collected. The
exec's wrapper writes the exit code into the runner's log directory (launch.WARM):
Docker may have forgotten the exec by the time a later run looks.

Adopted tasks are followed here: their end is the exit code's file (or an exec Docker
says ended), their logs are in the dead run's runner directory, and their runner is
removed with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import docker.errors

from ...task import State, TaskResult, TaskSpec
from ..logs import open_job_file
from . import engine, scratch
from .engine import engine_errors

RECORD = "task.json"
PREFIX = "adopted:"


def write_record(host_dir: str, record: Mapping[str, Any]) -> None:
    """Whole or not at all (a later run must never read half a record)."""
    path = os.path.join(host_dir, RECORD)
    with open(path + ".partial", "w") as f:
        json.dump(record, f)
    os.replace(path + ".partial", path)


def clear_record(host_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(host_dir, RECORD))


@dataclass(frozen=True)
class LeftExec:
    """A dead run's warm task, as its record and the runner's directory tell."""

    key: str
    products: str
    name: str  # the task's name in that run: its log files' base name
    exec_id: str
    runner: str  # the runner container's id
    host_dir: str
    started: float  # wall clock

    @property
    def logs(self) -> str:
        return os.path.join(self.host_dir, "logs")

    def exit_code(self) -> Optional[int]:
        """The code the wrapper wrote, once the task ended; None before."""
        try:
            # never blocking: the job could have made its own .rc a FIFO
            with os.fdopen(open_job_file(os.path.join(self.logs, self.name + ".rc"))) as f:
                text = f.read()
        except OSError:
            return None
        return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def left_execs(root: str) -> List[LeftExec]:
    """The tasks the runners under a dead run's directory ran when the run died."""
    found = []
    for name in sorted(os.listdir(root)):
        host_dir = os.path.join(root, name)
        try:
            with open(os.path.join(host_dir, RECORD)) as f:
                record = json.load(f)
            found.append(LeftExec(
                record["key"], record["products"], record["name"], record["exec"],
                record["runner"], host_dir, float(record["started"]),
            ))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an idle runner, or not a runner's directory
    return found


@dataclass(eq=False)
class _Adopted:
    left: LeftExec
    code: Optional[int] = None
    reason: Optional[str] = None
    ended_at: Optional[float] = None


class TakenExecs:
    """The dead runs' warm tasks this run follows, by handle."""

    def __init__(self, api):
        self.api = api
        self.counter = itertools.count()
        self.jobs: Dict[str, _Adopted] = {}

    def take(self, left: LeftExec) -> str:
        handle = f"{PREFIX}{next(self.counter)}-{left.name}"
        self.jobs[handle] = _Adopted(left)
        return handle

    def poll(self, handles: Sequence[str]) -> Dict[str, State]:
        states = {}
        for h in handles:
            job = self.jobs.get(h)
            if job is None:
                states[h] = State.LOST
            elif job.ended_at is not None or self._ended(job):
                # a runner the engine's restart stopped: not the task's doing
                states[h] = State.INTERRUPTED if job.reason else State.FINISHED
            else:
                states[h] = State.RUNNING
        return states

    def _ended(self, job: _Adopted) -> bool:
        job.code = job.left.exit_code()
        if job.code is None:
            try:
                with engine_errors("inspecting a task"):
                    inspected = self.api.exec_inspect(job.left.exec_id)
            except docker.errors.NotFound:
                job.reason = "its container stopped while the task ran (the Docker engine restarted)"
            else:
                if inspected.get("Running"):
                    return False
                # written between the two looks, or killed before its wrapper could write it
                job.code = job.left.exit_code()
                if job.code is None:
                    job.code = inspected.get("ExitCode")
        job.ended_at = time.time()
        return True

    def stop(self, handle: str) -> None:
        job = self.jobs.get(handle)
        if job is not None:
            with contextlib.suppress(docker.errors.APIError):
                with engine_errors("stopping a container"):
                    self.api.kill(job.left.runner)

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        job = self.jobs.get(handle)
        if job is None:
            return TaskResult(ok=False, reason="the task is unknown to crank")
        left = job.left
        # its logs carry the name the dead run gave the task
        files, tail = scratch.move_logs(left.logs, dataclasses.replace(task, name=left.name))
        if job.reason:
            return TaskResult(ok=False, reason=job.reason, stderr_tail=tail, log_files=files)
        memory = None
        with contextlib.suppress(docker.errors.APIError):
            with engine_errors("inspecting a container"):
                memory = (self.api.inspect_container(left.runner).get("HostConfig") or {}).get("Memory")
        ok, reason = engine.judge({"ExitCode": job.code, "OOMKilled": False}, task, memory)
        try:
            ended = os.stat(os.path.join(left.logs, left.name + ".rc")).st_mtime
        except OSError:
            ended = job.ended_at or time.time()
        return TaskResult(ok=ok, exit_code=job.code, reason=reason, stderr_tail=tail,
                          log_files=files, seconds=max(0.0, ended - left.started))

    def remove(self, handles: Sequence[str]) -> None:
        """Remove the adopted tasks' runners (a running task with them) and directories."""
        for h in handles:
            job = self.jobs.pop(h, None)
            if job is not None:
                remove_runner(self.api, job.left)

    def remove_all(self) -> None:
        self.remove(list(self.jobs))


def remove_runner(api, left: LeftExec) -> None:
    engine.remove_container(api, left.runner)
    scratch.rmtree(left.host_dir)
