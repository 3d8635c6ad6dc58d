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
  runner's ``oom`` events while the task ran; stdout/stderr written by the exec's shell
  into the runner's private scratch directory on the host (never the workdir, whose disk
  may be full), then moved into the task's log files when the task ends. A log that
  cannot be moved is dropped (no truncated log under its name) and the stderr tail comes
  from the scratch copy, as the cold path keeps it from the engine.

Nothing here runs on Snakemake's main loop except bookkeeping: runners are created,
execs started, runners checked and emptied, by a few threads, and ends are learned from
one event stream for the run. ``poll`` answers from memory.

Faults: ends are also found without the stream. After the stream reconnects (the engine
restarted, the connection broke) every running exec and idle runner is checked once, and
every few seconds the execs running for longer than ``check_age`` seconds are inspected,
a few per round, the least recently checked first. An exec the engine no longer knows
(an engine restart forgets them) is judged by its runner: a runner that is not running
fails its task at once with that reason. A launch that meets a transient engine error
shows the task as finished with that error (so the runner's tolerance clock runs) while
it is tried again, with backoff, until it starts or the task is released.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
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
from . import logs
from .paths import under

PREFIX = cold.WARM_PREFIX
# the runner's first process: waits forever, using only sh and sleep; ignoring SIGCHLD
# lets the kernel reap the processes that are left to it
IDLE = "trap '' CHLD; while :; do sleep 3600; done"
# the exec: the task's own command line ("$@" after the two log paths), its stdout and
# stderr into the log files (in the runner's scratch directory), then every other process
# of the user killed; SHLVL as this shell found it, so the task's shell counts as the first
WRAPPER = (
    'exec >"$1" 2>"$2"; shift 2; '
    'if [ -n "${CRANK_SHLVL+x}" ]; then SHLVL=$CRANK_SHLVL; unset CRANK_SHLVL; else unset SHLVL; fi; '
    '"$@"; rc=$?; kill -9 -1 2>/dev/null; exit $rc'
)
PRIVATE = ("/tmp", "/dev/shm")
# where a runner sees its scratch directory for the exec's stdout and stderr
LOGS = "/.crank-logs"
WORKERS = 6
# the safety net for lost exec_die events: every CHECK_INTERVAL_S, at most CHECK_BATCH
# execs running for more than CHECK_AGE_S are inspected
CHECK_INTERVAL_S = 5.0
CHECK_AGE_S = 10.0
CHECK_BATCH = 8
# a launch that met a transient engine error is tried again after these delays (doubling)
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
# the file naming the owner of a runners' temporary directory (stale-directory removal)
OWNER = "owner.json"
# how long a task killed by a signal waits to learn whether its runner stopped with it
DEAD_RUNNER_WAIT_S = 2.0
DEAD_RUNNER = (
    "killed by signal 9: its container stopped while the task ran (the Docker engine "
    "stopped or restarted, or the container was killed)"
)


@dataclass(eq=False)
class _Runner:
    id: str
    key: str
    host_dir: str
    # mount targets under /tmp or /dev/shm, relative: their directories are kept
    keep: Dict[str, Tuple[str, ...]]
    logs: str = ""  # the scratch directory for the exec's stdout and stderr (host side)
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
    ended: bool = False  # the exec's end is known (exit code or reason)
    reason: Optional[str] = None  # why it ended, when not by its own exit
    tail: str = ""
    log_files: Tuple[str, ...] = ()
    checked: float = 0.0  # when the safety net last inspected its exec (monotonic)


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
        self.stopping = threading.Event()
        self.check_interval = CHECK_INTERVAL_S
        self.check_age = CHECK_AGE_S
        self.check_batch = CHECK_BATCH
        self.recheck = threading.Event()  # check everything now (the stream reconnected)
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="crank-warm")
        self.stream = None
        self.stream_ok = False  # the event stream is connected
        self.since = time.time()
        self.watching = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="crank-events", daemon=True)
        self.watcher.start()
        self.checker = threading.Thread(target=self._check_loop, name="crank-check", daemon=True)
        self.checker.start()
        self.watching.wait(10)

    # ---- which tasks ------------------------------------------------------------------

    def _plan(self, task: TaskSpec) -> Optional[Tuple[str, List[Tuple[str, bool]], Dict[str, Any]]]:
        """(key, mounts, host config) when the task can run warm, else None."""
        if task.resources.gpus:
            return None
        mounts = cold.plan_mounts(
            task.workdir, [i.path for i in task.inputs], [o.path for o in task.products]
        )
        if any(under(private, path) for path, _ in mounts for private in PRIVATE + (LOGS,)):
            return None  # a mount at or above /tmp or /dev/shm: keep Docker's own
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
        if not self.stream_ok:
            # warm states come from the event stream: while it is down, an engine that
            # does not answer must count against the tolerance like a failed list would
            with cold.engine_errors("checking the engine"):
                self.api.ping()
        states = {}
        by_container = {}
        with self.lock:
            for h in handles:
                job = self.jobs.get(h)
                if job is None:
                    states[h] = State.LOST
                elif job.cold:
                    by_container[job.cold] = h
                else:
                    states[h] = job.state
        if by_container:
            for cid, state in self.backend.poll(list(by_container)).items():
                states[by_container[cid]] = state
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
            # an engine that does not answer raises: the runner tries the stop again
            with contextlib.suppress(docker.errors.APIError):  # already ended
                with cold.engine_errors("stopping a container"):
                    self.api.kill(runner.id)

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        with self.lock:
            job = self.jobs.get(handle)
            if job is None:
                return TaskResult(ok=False, reason="the task is unknown to crank")
            if job.error is not None:
                raise job.error
            if not job.cold and job.state is not State.FINISHED:
                # started again after a transient error, between the poll and now
                raise BackendUnavailable("the Docker engine failed while starting the task; it was started again")
        if job.cold:
            return self.backend.result(job.cold, task)
        if job.reason:
            ok, reason = False, job.reason
        else:
            state = {"ExitCode": job.exit_code, "OOMKilled": job.oom}
            ok, reason = cold.judge(state, task, job.memory)
        return TaskResult(
            ok=ok, exit_code=job.exit_code, reason=reason, stderr_tail=job.tail,
            log_files=job.log_files, seconds=job.seconds,
        )

    def release(self, handles: Sequence[str]) -> None:
        cold, runners = self._forget(handles, keep_ended=True)
        for runner in runners:
            self._remove(runner)
        if cold:
            self.backend.release(cold)

    def cancel(self, handles: Sequence[str]) -> None:
        cold, runners = self._forget(handles, keep_ended=False)
        kept = [runner for runner in runners if not self._remove(runner)]
        if cold:
            self.backend.cancel(cold)
        if kept:
            raise BackendUnavailable(
                f"the Docker engine did not remove {len(kept)} container(s) of this run"
            )

    def _forget(self, handles: Sequence[str], keep_ended: bool):
        """Drop the jobs; return their cold handles and the runners to remove: each job's
        runner, but with ``keep_ended`` the runner of a job that ended stays for reuse
        (one given up while it ran must not go on)."""
        cold, runners = [], []
        with self.lock:
            for h in handles:
                job = self.jobs.pop(h, None)
                if job is None:
                    continue
                job.canceled = True  # a launch still being tried again stops
                if job.cold:
                    cold.append(job.cold)
                elif job.runner is not None and not (keep_ended and job.ended):
                    job.runner.retire = True
                    runners.append(job.runner)
        return cold, runners

    def close(self) -> None:
        self.closed = True
        self.stopping.set()
        self.recheck.set()
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
            _rmtree(self.root)
        self.api.close()
        self.events_api.close()

    # ---- work done off the main loop -------------------------------------------------

    def _launch(self, job: _Job, plan) -> None:
        """Start the task; a transient engine error shows the task finished with that
        error (the runner's tolerance clock runs) and the launch is tried again, with
        backoff, until it starts, the task is released or crank closes."""
        delay = RETRY_FIRST_S
        while True:
            try:
                self._launch_once(job, plan)
                return
            except BackendUnavailable as e:
                with self.lock:
                    if job.canceled or job.ended:
                        return
                    job.error = e
                    job.state = State.FINISHED
                self.stats.reasons[f"retried: {type(e).__name__}"] += 1
                if self.stopping.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception as e:  # noqa: BLE001 - whatever it was, the task must not hang
                with self.lock:
                    if not job.ended:
                        job.error = e if isinstance(e, CrankError) else CrankError(str(e))
                        job.state = State.FINISHED
                return

    def _launch_once(self, job: _Job, plan) -> None:
        key, mounts, host_config = plan
        task = job.task
        for attempt in range(2):
            if job.canceled or self.closed:
                return
            if key in self.cold_keys:
                break
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
            except Exception as e:  # noqa: BLE001
                with self.lock:
                    if job.ended:
                        return  # the exec ran and ended; only its start's answer was lost
                    if job.exec_id:
                        # an exec whose start may have happened: its end must not count
                        self.by_exec.pop(job.exec_id, None)
                        job.exec_id = None
                    if runner is not None:
                        self.busy.pop(runner.id, None)
                        job.runner = None
                if runner is not None:
                    runner.retire = True
                    self._remove(runner)
                if isinstance(e, BackendUnavailable):
                    raise  # transient: tried again by _launch
                if runner is not None and attempt == 0:
                    continue  # a runner that died under us: one more, then cold
                self.cold_keys.add(key)
                self.stats.reasons[f"cold: {type(e).__name__}"] += 1
                break
        self._run_cold(job)

    def _run_cold(self, job: _Job) -> None:
        try:
            handle = self.backend.submit_cold(job.task)
        except BackendUnavailable:
            raise  # transient: tried again by _launch
        except Exception as e:  # noqa: BLE001 - reported through result()
            with self.lock:
                job.error = e if isinstance(e, CrankError) else CrankError(str(e))
                job.state = State.FINISHED
            return
        self.stats.cold += 1
        with self.lock:
            if job.canceled:
                self.backend.cancel([handle])
                return
            job.error = None
            job.cold = handle

    def _acquire(self, key, task, mounts, host_config) -> _Runner:
        with self.lock:
            while self.idle[key]:
                runner = self.idle[key].pop()
                if not runner.dead:
                    return runner
        return self._start_runner(key, task, mounts, host_config)

    def _make_root(self) -> str:
        """The run's temporary directory, with a file naming its owner, so that a later
        run can tell it stale when this one was killed hard (remove_stale_dirs)."""
        with self.lock:
            if self.root is None:
                root = tempfile.mkdtemp(prefix="crank-warm-")
                with open(os.path.join(root, OWNER), "w") as f:
                    json.dump(_owner(self.backend), f)
                self.root = root
            return self.root

    def _start_runner(self, key, task, mounts, host_config) -> _Runner:
        host_dir = tempfile.mkdtemp(dir=self._make_root())
        binds = []
        keep = {}
        for private in PRIVATE:
            path = os.path.join(host_dir, private.strip("/").replace("/", "-"))
            os.mkdir(path)
            os.chmod(path, 0o1777)
            binds.append(docker.types.Mount(target=private, source=path, type="bind"))
            keep[path] = tuple(
                os.path.relpath(p, private) for p, _ in mounts if under(p, private) and p != private
            )
        logs = os.path.join(host_dir, "logs")
        os.mkdir(logs, 0o700)
        binds.append(docker.types.Mount(target=LOGS, source=logs, type="bind"))
        config = dict(host_config)
        config["mounts"] = list(config["mounts"]) + binds
        name = f"crank-{self.backend.run_id[:8]}-warm-{next(self.counter)}"
        try:
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
        except Exception:
            # the engine may have made it before the connection broke
            with contextlib.suppress(Exception):
                self.api.remove_container(name, force=True)
            _rmtree(host_dir)
            raise
        runner = _Runner(cid, key, host_dir, keep, logs=logs)
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
        scratch = f"{LOGS}/{task.name}"
        command = ["/bin/sh", "-c", WRAPPER, "crank", scratch + ".stdout", scratch + ".stderr", *task.argv]
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
            job.error = None
            if not job.ended:
                job.state = State.RUNNING

    def _finish(self, job: _Job, code: Optional[int], reason: Optional[str] = None) -> None:
        """An exec ended (under the lock): its logs are collected, then it is FINISHED."""
        if job.ended:
            return
        runner = job.runner
        job.ended = True
        job.exit_code = code
        job.reason = reason
        job.oom = bool(runner and runner.oom)
        job.seconds = time.monotonic() - job.started if job.started else None
        if job.exec_id:
            self.by_exec.pop(job.exec_id, None)
        if runner is not None:
            self.busy.pop(runner.id, None)
        try:
            self.workers.submit(self._collect, job, runner)
        except RuntimeError:  # shutting down: no logs to move any more
            job.state = State.FINISHED

    def _collect(self, job: _Job, runner: Optional[_Runner]) -> None:
        """Move the exec's logs from the runner's scratch directory into the task's log
        directory, then report the task finished and recycle the runner."""
        try:
            if runner is not None and not job.canceled:
                job.log_files, job.tail = _move_logs(runner.logs, job.task)
            if (
                runner is not None and not runner.retire and not runner.oom and not job.reason
                and job.exit_code is not None and job.exit_code > 128
            ):
                # killed by a signal: with its runner (whose stop kills every process in
                # it, and whose own end Docker reports just after) if the runner stops
                if self._stops_within(runner, DEAD_RUNNER_WAIT_S):
                    runner.dead = True
                    job.reason = DEAD_RUNNER
        finally:
            with self.lock:
                job.error = None
                job.state = State.FINISHED
            if runner is not None:
                self._recycle(runner)

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
                _empty(runner.logs, (), mode=0o700)
            except OSError:
                reason = "could not empty /tmp"
        if reason is not None:
            self.stats.reasons[reason] += 1
            runner.retire = True
            self._remove(runner)
            return
        with self.lock:
            if runner.retire or runner.dead or self.closed:
                pass
            else:
                self.idle[runner.key].append(runner)
                return
        self._remove(runner)

    def _changes(self, cid: str) -> Tuple[Tuple[str, int], ...]:
        return tuple(sorted((c["Path"], c["Kind"]) for c in self.api.diff(cid) or ()))

    def _remove(self, runner: _Runner) -> bool:
        """Remove a runner; False when the engine did not (it stays for the next start's
        orphan removal, with its directory, whose owner file names this run)."""
        with self.lock:
            known = self.runners.pop(runner.id, None)
            for idle in self.idle.values():
                if runner in idle:
                    idle.remove(runner)
        if known is None:
            return True
        try:
            self.api.remove_container(runner.id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: removal already in progress
                return False
        except Exception:  # noqa: BLE001 - the engine did not answer
            return False
        self.stats.runners_removed += 1
        _rmtree(runner.host_dir)
        return True

    # ---- the event stream -------------------------------------------------------------

    def _watch(self) -> None:
        filters = {"label": f"{cold.LABEL_RUN}={self.backend.run_id}", "type": "container"}
        connected = False
        while not self.closed:
            try:
                self.stream = self.events_api.events(filters=filters, decode=True, since=self.since)
                if connected:
                    # events may have been lost while the stream was down (an engine that
                    # restarted keeps none): check every running exec and idle runner
                    self.recheck.set()
                connected = self.stream_ok = True
                self.watching.set()
                for event in self.stream:
                    self.since = event.get("time", self.since)
                    self._on_event(event)
            except Exception:  # noqa: BLE001 - reconnect, replaying from `since`
                pass
            self.stream_ok = False
            if self.closed:
                return
            self.watching.set()
            if self.stopping.wait(0.5):
                return

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
                self._runner_died(runner)

    def _runner_died(self, runner: _Runner) -> None:
        """A runner's container stopped (under the lock): its task, if any, ends now."""
        runner.dead = True
        job = self.busy.get(runner.id)
        if job is not None and job.exec_id:
            if runner.retire:
                self._finish(job, 137)  # crank killed it (wall time, cancel)
            else:
                self._finish(job, 137, DEAD_RUNNER)
        elif job is None:
            for idle in self.idle.values():
                if runner in idle:
                    idle.remove(runner)
                    with contextlib.suppress(RuntimeError):
                        self.workers.submit(self._remove, runner)

    # ---- the safety net: ends the event stream did not bring ---------------------------

    def _check_loop(self) -> None:
        while not self.closed:
            everything = self.recheck.wait(self.check_interval)
            if self.closed:
                return
            self.recheck.clear()
            try:
                self._check(everything)
            except Exception:  # noqa: BLE001 - the engine may be down: next round
                if everything:
                    self.recheck.set()
                    self.stopping.wait(1)

    def _check(self, everything: bool) -> None:
        """Inspect running execs: all of them (after the stream reconnected), or the few
        oldest-checked of those running for more than ``check_age`` seconds."""
        now = time.monotonic()
        with self.lock:
            jobs = [
                j for j in self.busy.values()
                if j.exec_id and not j.ended and j.started is not None
                and (everything or now - j.started > self.check_age)
            ]
            idle = [r for rs in self.idle.values() for r in rs] if everything else []
        jobs.sort(key=lambda j: j.checked)
        if not everything:
            jobs = jobs[: self.check_batch]
        for job in jobs:
            self._check_job(job)
        for runner in idle:
            if not self._runner_running(runner):
                with self.lock:
                    self._runner_died(runner)

    def _check_job(self, job: _Job) -> None:
        exec_id, runner = job.exec_id, job.runner
        if exec_id is None or runner is None:
            return
        job.checked = time.monotonic()
        try:
            info = self.api.exec_inspect(exec_id)
        except docker.errors.NotFound:
            info = None  # an engine that restarted forgets its execs
        if info is not None and info.get("Running"):
            return
        code = info.get("ExitCode") if info is not None else None
        if code is not None:
            with self.lock:
                if job.exec_id == exec_id:
                    self._finish(job, int(code))
            return
        if not self._runner_running(runner):
            with self.lock:
                if job.exec_id == exec_id and job.runner is runner:
                    self._runner_died(runner)
            return
        with self.lock:
            if job.exec_id == exec_id and not job.ended:
                runner.retire = True
                self._finish(job, None, "crank lost track of the task: the Docker engine no longer knows its exec")

    def _stops_within(self, runner: _Runner, seconds: float) -> bool:
        """Whether the runner's container stops (or is gone) within ``seconds``: one
        request that the engine answers when it stops."""
        if runner.dead:
            return True
        try:
            self.api.wait(runner.id, timeout=seconds)
            return True
        except docker.errors.NotFound:
            return True
        except Exception:  # noqa: BLE001 - still running (timed out), or no answer
            return runner.dead

    def _runner_running(self, runner: _Runner) -> bool:
        """Whether the runner's container runs; raises when the engine does not answer."""
        try:
            inspected = self.api.inspect_container(runner.id)
        except docker.errors.NotFound:
            return False
        return bool((inspected.get("State") or {}).get("Running"))


def _owner(backend) -> Dict[str, Any]:
    """Who a runners' temporary directory belongs to."""
    return {
        "workdir": backend.workdir,
        "engine": _engine_of(backend),
        "run": backend.run_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _engine_of(backend) -> str:
    return backend.options.base_url or os.environ.get("DOCKER_HOST") or "default"


def remove_stale_dirs(backend, live_runs: Sequence[str]) -> int:
    """Remove the runners' temporary directories that runs killed hard left behind: those
    of this workdir and engine whose run is not in ``live_runs`` (the runs of this workdir
    that are alive, see runs.py). Returns how many."""
    removed = 0
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith("crank-warm-")]
    except OSError:
        return 0
    for name in names:
        root = os.path.join(base, name)
        try:
            with open(os.path.join(root, OWNER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file: another version, or not crank's)
        if not isinstance(owner, dict):
            continue
        if owner.get("workdir") != backend.workdir or owner.get("engine") != _engine_of(backend):
            continue
        if owner.get("run") == backend.run_id or owner.get("run") in live_runs:
            continue
        _rmtree(root)
        removed += not os.path.exists(root)
    return removed


def _rmtree(path: str) -> None:
    def retry(function, p, _info):
        with contextlib.suppress(OSError):
            _writable_then_retry(function, p, _info)

    shutil.rmtree(path, onerror=retry)


def _move_logs(scratch: str, task: TaskSpec) -> Tuple[Tuple[str, ...], str]:
    """Move ``<scratch>/<name>.stdout|.stderr`` into ``<log_dir>/<name>.*``; return the
    files saved and the last lines of stderr, read from the scratch copy. The task could
    write its scratch directory: only regular files are taken, never through a symlink
    (see logs.py). A log that cannot be moved (disk full, no permission, not a regular
    file) is dropped, never an error, and leaves no truncated file under its name; the
    tail then says what was not saved."""
    tail, saved, problems = "", [], []
    dir_fd = None
    try:
        for suffix in (".stdout", ".stderr"):
            name = task.name + suffix
            src = os.path.join(scratch, name)
            try:
                fd = logs.open_job_file(src)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(logs.problem(name, e))
                _unlink(src)
                continue
            try:
                if suffix == ".stderr":
                    tail = logs.read_tail(fd)
                if dir_fd is None:
                    dir_fd = logs.open_log_dir(task)
                _move(fd, src, dir_fd, name)
                saved.append(os.path.join(task.log_dir, name))
            except OSError as e:
                problems.append(logs.problem(name, e))
                if dir_fd is not None:
                    logs.remove_log(dir_fd, name)
            finally:
                os.close(fd)
                _unlink(src)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return tuple(saved), logs.with_unsaved(tail, problems)


def _move(fd: int, src: str, dir_fd: int, name: str) -> None:
    """Put the open scratch file ``fd`` (at ``src``) under ``name`` in the log directory:
    renamed when on the same file system and still the file opened, else copied from
    ``fd``, into a file created without following a symlink."""
    try:
        os.replace(src, name, dst_dir_fd=dir_fd)
        moved = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        opened = os.fstat(fd)
        if (moved.st_dev, moved.st_ino) == (opened.st_dev, opened.st_ino):
            return
        logs.remove_log(dir_fd, name)  # replaced after it was opened: not what was checked
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    with os.fdopen(fd, "rb", closefd=False) as source, os.fdopen(logs.create_file(dir_fd, name), "wb") as sink:
        source.seek(0)
        shutil.copyfileobj(source, sink)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _empty(root: str, keep: Sequence[str], mode: int = 0o1777) -> None:
    """Remove everything under ``root`` except the directories of ``keep`` (relative mount
    targets) and the path down to them; entries are removed on the host, where nothing is
    mounted under them."""
    parents = {os.path.dirname(k) for k in keep}
    for k in keep:
        while k:
            k = os.path.dirname(k)
            parents.add(k)
    _empty_dir(root, "", set(keep), parents)
    os.chmod(root, mode)


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
