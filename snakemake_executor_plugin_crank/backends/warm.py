"""Warm runners for the Docker backend: jobs run by exec in containers started earlier.

Starting a container costs Docker far more than an exec into a running one (about 0.45 s
against 0.07 s on the machine of docs/performance.md). The pool keeps started containers
("runners") per environment: image, bind mounts, limits, network, extra host config and
user, which are fixed when a container is created. A task whose environment has an idle
runner runs in it by exec; otherwise a new runner is started for it.

What a task sees is what a fresh container would give it:
- one task at a time per runner, with the task's environment, working directory, user
  and limits (the runner's, which are the task's);
- a private, empty ``/tmp`` and ``/dev/shm``: each is a directory on the host made for the
  runner, bind-mounted, and emptied from the host after every task (never from inside,
  where a workflow directory under /tmp is mounted and must not be touched);
- no process of an earlier task: when the command ends, every process of the task's user
  is killed (``kill -9 -1`` from the exec's shell: the runner's first process is exempt),
  as the end of a container's first process kills the rest;
- no file of an earlier task: after each task the container's own file system is
  compared with what it was when the runner started (``GET /containers/{id}/changes``);
  a runner whose file system changed, that ran out of memory, was killed or whose emptying
  failed is removed, never reused;
- the exit code from the exec (Docker's ``exec_die`` event), out-of-memory from the
  runner's ``oom`` events while the task ran, stdout/stderr written to the same log files
  by the exec's shell itself.

Nothing here runs on Snakemake's main loop except bookkeeping: runners are created,
execs started, runners checked and emptied, by a few threads, and ends are learned from
one event stream for the run. ``poll`` answers from memory.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors
import docker.types

from ..errors import BackendUnavailable, CrankError
from ..task import State, TaskResult, TaskSpec
from . import docker as cold
from .logs import TAIL_LINES

PREFIX = cold.WARM_PREFIX
# the runner's first process: waits forever, using only sh and sleep; ignoring SIGCHLD
# lets the kernel reap the processes that are left to it
IDLE = "trap '' CHLD; while :; do sleep 3600; done"
# the exec: the task's own command line ("$@" after the two log paths), its stdout and
# stderr into the log files, then every other process of the user killed; SHLVL as this
# shell found it, so the task's shell counts as the first
WRAPPER = (
    'exec >"$1" 2>"$2"; shift 2; '
    'if [ -n "${CRANK_SHLVL+x}" ]; then SHLVL=$CRANK_SHLVL; unset CRANK_SHLVL; else unset SHLVL; fi; '
    '"$@"; rc=$?; kill -9 -1 2>/dev/null; exit $rc'
)
PRIVATE = ("/tmp", "/dev/shm")
WORKERS = 6


def is_warm(handle: str) -> bool:
    return handle.startswith(PREFIX)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(eq=False)
class _Runner:
    id: str
    key: str
    host_dir: str
    # mount targets under /tmp or /dev/shm, relative: their directories are kept
    keep: Dict[str, Tuple[str, ...]]
    baseline: Tuple[Tuple[str, int], ...] = ()
    oom: bool = False
    dead: bool = False
    retire: bool = False


@dataclass(eq=False)
class _Job:
    handle: str
    task: TaskSpec
    state: State = State.QUEUED
    runner: Optional[_Runner] = None
    exec_id: Optional[str] = None
    started: Optional[float] = None
    exit_code: Optional[int] = None
    oom: bool = False
    seconds: Optional[float] = None
    error: Optional[Exception] = None
    memory: Optional[int] = None  # the runner's memory limit, bytes
    cold: Optional[str] = None  # run as an ordinary container instead (handle)
    canceled: bool = False


@dataclass
class PoolStats:
    runners_started: int = 0
    runners_removed: int = 0
    execs: int = 0
    cold: int = 0
    reasons: Dict[str, int] = field(default_factory=collections.Counter)


class WarmPool:
    """Runs eligible tasks of a DockerBackend in warm runners (see the module text)."""

    def __init__(self, backend, make_api):
        self.backend = backend
        self.api = make_api(WORKERS + 4)
        self.events_api = make_api(2)
        self.user = f"{os.getuid()}:{os.getgid()}"
        self.root: Optional[str] = None  # made with the first runner
        self.lock = threading.Lock()
        self.jobs: Dict[str, _Job] = {}
        self.by_exec: Dict[str, _Job] = {}
        self.runners: Dict[str, _Runner] = {}  # by container id
        self.busy: Dict[str, _Job] = {}  # runner id -> job
        self.idle: Dict[str, List[_Runner]] = collections.defaultdict(list)
        self.cold_keys: set = set()
        self.counter = itertools.count()
        self.stats = PoolStats()
        self.closed = False
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="crank-warm")
        self.stream = None
        self.since = time.time()
        self.watching = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="crank-events", daemon=True)
        self.watcher.start()
        self.watching.wait(10)

    # ---- which tasks ------------------------------------------------------------------

    def _plan(self, task: TaskSpec) -> Optional[Tuple[str, List[Tuple[str, bool]], Dict[str, Any]]]:
        """(key, mounts, host config) when the task can run warm, else None."""
        if task.resources.gpus:
            return None
        mounts = cold.plan_mounts(
            task.workdir, [i.path for i in task.inputs], [o.path for o in task.products]
        )
        if any(_under(private, path) for path, _ in mounts for private in PRIVATE):
            return None  # a mount at or above /tmp or /dev/shm: keep Docker's own
        if not any(rw and _under(task.log_dir, path) for path, rw in mounts):
            return None  # the exec writes the logs through a mount
        host_config = self.backend.host_config_for(task, mounts)
        key = json.dumps(
            [task.image, self.user, mounts, {k: v for k, v in host_config.items() if k != "mounts"}],
            sort_keys=True, default=str,
        )
        return key, mounts, host_config

    # ---- the backend operations for warm handles -------------------------------------

    def try_submit(self, task: TaskSpec) -> Optional[str]:
        """A warm handle for the task, or None when it should run as its own container."""
        if self.closed:
            return None
        plan = self._plan(task)
        if plan is None or plan[0] in self.cold_keys:
            return None
        self.backend._ensure_image(task.image)  # refusals reach the caller now, as today
        job = _Job(f"{PREFIX}{next(self.counter)}-{task.name}", task)
        job.memory = plan[2].get("mem_limit")
        with self.lock:
            self.jobs[job.handle] = job
        self.workers.submit(self._launch, job, plan)
        return job.handle

    def poll(self, handles: Sequence[str]) -> Dict[str, State]:
        states = {}
        cold = {}
        with self.lock:
            for h in handles:
                job = self.jobs.get(h)
                if job is None:
                    states[h] = State.LOST
                elif job.cold:
                    cold[job.cold] = h
                else:
                    states[h] = job.state
        if cold:
            for cid, state in self.backend.poll(list(cold)).items():
                states[cold[cid]] = state
        return states

    def stop(self, handle: str) -> None:
        job = self.jobs.get(handle)
        if job is None:
            return
        if job.cold:
            return self.backend.stop(job.cold)
        runner = job.runner
        if runner is not None:
            runner.retire = True
            with contextlib.suppress(docker.errors.APIError, BackendUnavailable):
                with cold.engine_errors("stopping a container"):
                    self.api.kill(runner.id)

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        job = self.jobs.get(handle)
        if job is None:
            return TaskResult(ok=False, reason="the task is unknown to crank")
        if job.error is not None:
            raise job.error
        if job.cold:
            return self.backend.result(job.cold, task)
        base = os.path.join(task.log_dir, task.name)
        files = tuple(p for p in (base + ".stdout", base + ".stderr") if os.path.exists(p))
        state = {"ExitCode": job.exit_code, "OOMKilled": job.oom, "Error": ""}
        code = job.exit_code
        if _REASON_TAKES_LIMIT:
            reason = cold.failure_reason(state, task, job.memory)
            ok = code == 0 and (not reason or job.oom)
        else:
            reason = cold.failure_reason(state, task)
            ok = code == 0 and not reason
        return TaskResult(
            ok=ok, exit_code=code, reason=reason, stderr_tail=_tail(base + ".stderr"),
            log_files=files, seconds=job.seconds,
        )

    def release(self, handles: Sequence[str]) -> None:
        cold = []
        with self.lock:
            for h in handles:
                job = self.jobs.pop(h, None)
                if job is not None and job.cold:
                    cold.append(job.cold)
        if cold:
            self.backend.release(cold)

    def cancel(self, handles: Sequence[str]) -> None:
        cold, runners = [], []
        with self.lock:
            for h in handles:
                job = self.jobs.pop(h, None)
                if job is None:
                    continue
                job.canceled = True
                if job.cold:
                    cold.append(job.cold)
                if job.runner is not None:
                    job.runner.retire = True
                    runners.append(job.runner)
        for runner in runners:
            self._remove(runner)
        if cold:
            self.backend.cancel(cold)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            if self.stream is not None:
                self.stream.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        # removals in parallel: each costs the engine a few tenths of a second
        with ThreadPoolExecutor(WORKERS) as removers:
            list(removers.map(self._remove, list(self.runners.values())))
        self.workers.shutdown(wait=True)
        for runner in list(self.runners.values()):  # started while closing
            self._remove(runner)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.api.close()
        self.events_api.close()

    # ---- work done off the main loop -------------------------------------------------

    def _launch(self, job: _Job, plan) -> None:
        key, mounts, host_config = plan
        task = job.task
        for attempt in range(2):
            if job.canceled or self.closed:
                return
            runner = None
            try:
                runner = self._acquire(key, task, mounts, host_config)
                with self.lock:
                    if job.canceled:
                        self.idle[key].append(runner)
                        return
                    job.runner = runner
                    self.busy[runner.id] = job
                self._exec(job, runner)
                return
            except Exception as e:  # noqa: BLE001 - whatever it was, the task must not hang
                if runner is not None:
                    with self.lock:
                        self.busy.pop(runner.id, None)
                        job.runner = None
                    runner.retire = True
                    self._remove(runner)
                    if attempt == 0:
                        continue  # a runner that died under us: one more, then cold
                self.cold_keys.add(key)
                self.stats.reasons[f"cold: {type(e).__name__}"] += 1
                break
        self._run_cold(job)

    def _run_cold(self, job: _Job) -> None:
        try:
            handle = self.backend.submit_cold(job.task)
        except Exception as e:  # noqa: BLE001 - reported through result()
            job.error = e if isinstance(e, CrankError) else CrankError(str(e))
            job.state = State.FINISHED
            return
        self.stats.cold += 1
        with self.lock:
            if job.canceled:
                self.backend.cancel([handle])
                return
            job.cold = handle

    def _acquire(self, key, task, mounts, host_config) -> _Runner:
        with self.lock:
            if self.idle[key]:
                return self.idle[key].pop()
        return self._start_runner(key, task, mounts, host_config)

    def _start_runner(self, key, task, mounts, host_config) -> _Runner:
        with self.lock:
            if self.root is None:
                self.root = tempfile.mkdtemp(prefix="crank-warm-")
        host_dir = tempfile.mkdtemp(dir=self.root)
        binds = []
        keep = {}
        for private in PRIVATE:
            path = os.path.join(host_dir, private.strip("/").replace("/", "-"))
            os.mkdir(path)
            os.chmod(path, 0o1777)
            binds.append(docker.types.Mount(target=private, source=path, type="bind"))
            keep[path] = tuple(
                os.path.relpath(p, private) for p, _ in mounts if _under(p, private) and p != private
            )
        config = dict(host_config)
        config["mounts"] = list(config["mounts"]) + binds
        name = f"crank-{self.backend.run_id[:8]}-warm-{next(self.counter)}"
        with cold.engine_errors("creating a container"):
            cid = self.api.create_container(
                image=task.image,
                command=["/bin/sh", "-c", IDLE],
                user=self.user,
                labels={
                    cold.LABEL_RUN: self.backend.run_id,
                    cold.LABEL_JOB: "",
                    cold.LABEL_WORKDIR: self.backend.workdir,
                },
                name=name,
                host_config=self.api.create_host_config(**config),
            )["Id"]
        runner = _Runner(cid, key, host_dir, keep)
        with self.lock:
            self.runners[cid] = runner
        try:
            with cold.engine_errors("starting a container"):
                self.api.start(cid)
                runner.baseline = self._changes(cid)
        except Exception:
            runner.retire = True
            self._remove(runner)
            raise
        self.stats.runners_started += 1
        if self.closed:
            self._remove(runner)
            raise CrankError("crank is shutting down")
        return runner

    def _exec(self, job: _Job, runner: _Runner) -> None:
        task = job.task
        os.makedirs(task.log_dir, exist_ok=True)
        base = os.path.join(task.log_dir, task.name)
        command = ["/bin/sh", "-c", WRAPPER, "crank", base + ".stdout", base + ".stderr", *task.argv]
        with cold.engine_errors("starting a task"):
            exec_id = self.api.exec_create(
                runner.id, command, environment=_environment(task.env), workdir=task.workdir,
                user=self.user,
            )["Id"]
            with self.lock:
                job.exec_id = exec_id
                self.by_exec[exec_id] = job
            job.started = time.monotonic()
            self.api.exec_start(exec_id, detach=True)
        self.stats.execs += 1
        with self.lock:
            if job.state is State.QUEUED:
                job.state = State.RUNNING

    def _finish(self, job: _Job, code: Optional[int]) -> None:
        """An exec ended (under the lock)."""
        if job.state is State.FINISHED:
            return
        runner = job.runner
        job.exit_code = code
        job.oom = bool(runner and runner.oom)
        job.seconds = time.monotonic() - job.started if job.started else None
        job.state = State.FINISHED
        if runner is not None:
            self.busy.pop(runner.id, None)
            self.workers.submit(self._recycle, runner)

    def _recycle(self, runner: _Runner) -> None:
        """Back to the idle runners if it is as clean as a fresh one, else removed."""
        reason = None
        if runner.retire or runner.dead or runner.oom or self.closed:
            reason = "killed, dead or out of memory"
        else:
            try:
                if self._changes(runner.id) != runner.baseline:
                    reason = "its file system changed"
            except Exception:  # noqa: BLE001
                reason = "changes unknown"
        if reason is None:
            try:
                for path, keep in runner.keep.items():
                    _empty(path, keep)
            except OSError:
                reason = "could not empty /tmp"
        if reason is not None:
            self.stats.reasons[reason] += 1
            runner.retire = True
            self._remove(runner)
            return
        with self.lock:
            if runner.retire or self.closed:
                pass
            else:
                self.idle[runner.key].append(runner)
                return
        self._remove(runner)

    def _changes(self, cid: str) -> Tuple[Tuple[str, int], ...]:
        return tuple(sorted((c["Path"], c["Kind"]) for c in self.api.diff(cid) or ()))

    def _remove(self, runner: _Runner) -> None:
        with self.lock:
            known = self.runners.pop(runner.id, None)
            for idle in self.idle.values():
                if runner in idle:
                    idle.remove(runner)
        if known is None:
            return
        with contextlib.suppress(Exception):
            self.api.remove_container(runner.id, force=True)
        self.stats.runners_removed += 1
        shutil.rmtree(runner.host_dir, ignore_errors=True)

    # ---- the event stream -------------------------------------------------------------

    def _watch(self) -> None:
        filters = {"label": f"{cold.LABEL_RUN}={self.backend.run_id}", "type": "container"}
        while not self.closed:
            try:
                self.stream = self.events_api.events(filters=filters, decode=True, since=self.since)
                self.watching.set()
                for event in self.stream:
                    self.since = event.get("time", self.since)
                    self._on_event(event)
            except Exception:  # noqa: BLE001 - reconnect, replaying from `since`
                if self.closed:
                    return
                self.watching.set()
                time.sleep(0.5)

    def _on_event(self, event: Mapping[str, Any]) -> None:
        action = event.get("Action") or ""
        actor = event.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        with self.lock:
            runner = self.runners.get(actor.get("ID") or event.get("id") or "")
            if action == "oom" and runner is not None:
                runner.oom = True
            elif action.startswith("exec_die"):
                job = self.by_exec.pop(attrs.get("execID", ""), None)
                if job is not None:
                    code = attrs.get("exitCode")
                    self._finish(job, int(code) if code not in (None, "") else None)
            elif action == "die" and runner is not None:
                runner.dead = True
                job = self.busy.get(runner.id)
                if job is not None and job.exec_id:
                    # the runner was killed (wall time, cancel): so was the task
                    self.by_exec.pop(job.exec_id, None)
                    self._finish(job, 137)


def _empty(root: str, keep: Sequence[str]) -> None:
    """Remove everything under ``root`` except the directories of ``keep`` (relative mount
    targets) and the path down to them; entries are removed on the host, where nothing is
    mounted under them."""
    parents = {os.path.dirname(k) for k in keep}
    for k in keep:
        while k:
            k = os.path.dirname(k)
            parents.add(k)
    _empty_dir(root, "", set(keep), parents)
    os.chmod(root, 0o1777)


def _empty_dir(root: str, rel: str, keep: set, parents: set) -> None:
    for entry in os.scandir(os.path.join(root, rel)):
        sub = os.path.join(rel, entry.name)
        if sub in keep:
            continue
        if sub in parents and entry.is_dir(follow_symlinks=False):
            _empty_dir(root, sub, keep, parents)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, onerror=_writable_then_retry)
        else:
            os.unlink(entry.path)


def _writable_then_retry(function, path, _info):
    os.chmod(os.path.dirname(path), stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
    function(path)


def _environment(env: Mapping[str, str]) -> Dict[str, str]:
    env = dict(env)
    if "SHLVL" in env:  # the wrapper's shell would count itself in it
        env["CRANK_SHLVL"] = env.pop("SHLVL")
    return env


def _tail(path: str) -> str:
    """The last TAIL_LINES lines of a log file, as save_logs keeps them."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk = 65536
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                data = f.read()
                if start == 0 or data.count(b"\n") > TAIL_LINES:
                    break
                chunk *= 4
    except OSError:
        return ""
    parts = data.split(b"\n")
    if start > 0:
        parts = parts[1:]  # a partial first line
    if parts and parts[-1] == b"":
        parts.pop()
    return b"\n".join(parts[-TAIL_LINES:]).decode("utf-8", "replace")


# the failure reason names the container's real memory limit where docker.py knows it
_REASON_TAKES_LIMIT = len(inspect.signature(cold.failure_reason).parameters) > 2
