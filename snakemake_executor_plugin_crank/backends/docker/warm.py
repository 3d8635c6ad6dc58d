"""Warm runners for the Docker backend: jobs run by exec in containers started earlier.

Starting a container costs Docker far more than an exec into a running one (about 0.45 s
against 0.07 s on the machine of docs/performance.md). The pool keeps started containers
("runners") per environment (what a container fixes when it is created). A task whose
environment has an idle runner runs in it by exec; otherwise a new runner is started for
it. What the task sees is what a fresh container would give it (runners.py says how).

Nothing here runs on Snakemake's main loop except bookkeeping: runners are created,
execs started, runners checked and emptied, by a few threads, and ends are learned from
the watcher (events.py: the run's event stream and its safety net). ``poll`` answers
from memory. A task that cannot run warm, or whose environment failed to start a runner,
runs in a container of its own, through the cold runner the pool is given; its handle
stays the pool's. A launch that meets a transient engine error is tried again (_launch).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ...errors import BackendUnavailable, CrankError
from ...task import State, TaskResult, TaskSpec, Usage
from .. import cgroup
from ..adoption import products_id
from ..live import LiveLog, live_logs
from . import copying, engine, launch, left_execs, scratch
from .engine import DockerOptions, engine_errors
from .images import Images
from .events import Callbacks, Watcher
from .runners import USAGE, PoolStats, Runner, Runners, environment

# the handles of tasks the pool runs
PREFIX = "warm:"
WORKERS = 6
# a launch that met a transient engine error is tried again after these delays (doubling)
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
# how long a task killed by a signal waits to learn whether its runner stopped with it
DEAD_RUNNER_WAIT_S = 2.0
DEAD_RUNNER = (
    "killed by signal 9: its container stopped while the task ran (the Docker engine "
    "stopped or restarted, or the container was killed)"
)


@dataclass(eq=False)
class _Job:
    handle: str
    task: TaskSpec
    state: State = State.QUEUED
    runner: Optional[Runner] = None
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
    usage: Usage = Usage()
    # what to copy into its runner when the engine does not see the client's files (copying.py)
    files: Optional[list] = None
    # its logs while it runs (live.py), copied under ``live_lock``
    live: Dict[str, LiveLog] = field(default_factory=dict)
    live_lock: threading.Lock = field(default_factory=threading.Lock)


class WarmPool:
    """Runs eligible tasks in warm runners (see the module text); ``cold`` runs the rest
    (submit, poll, stop, result, cancel of container handles)."""

    def __init__(self, cold, make_api: Callable[[int], Any], images: Images,
                 options: DockerOptions, run_id: str, workdir: str):
        self.cold = cold
        self.images = images
        self.options = options
        self.api = make_api(WORKERS + 4)
        self.lock = threading.Lock()
        self.jobs: Dict[str, _Job] = {}
        self.by_exec: Dict[str, _Job] = {}
        self.busy: Dict[str, _Job] = {}  # runner id -> job
        self.cold_keys: set = set()
        self.counter = itertools.count()
        self.stats = PoolStats()
        self.closed = False
        self.stopping = threading.Event()
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="crank-warm")
        self.watcher = Watcher(self.api, make_api(2), run_id, Callbacks(
            exited=self._exited, oom=lambda runner: self.containers.oom(runner),
            stopped=self._stopped, lost=self._lost,
        ))
        self.containers = Runners(self.api, run_id, workdir, options.base_url, self.lock,
                                  self.watcher, self.workers, self.stats)
        self.watcher.start()
        scratch.LiveCopier(self._running_logs, self.stopping)

    # ---- the backend operations for warm handles -------------------------------------

    def try_submit(self, task: TaskSpec) -> Optional[str]:
        """A warm handle for the task, or None when it should run as its own container."""
        if self.closed:
            return None
        self.images.ensure(task.image)  # refusals reach the caller now, as today
        copy = self.cold.sharing.copies(task)
        plan = environment(task, self.options, self.containers.user, copy)
        if plan is None or plan[0] in self.cold_keys:
            return None
        job = _Job(f"{PREFIX}{next(self.counter)}-{task.name}", task,
                   live=live_logs(task))
        job.memory = plan[2].get("mem_limit")
        if copy:  # planned now: a missing input is the caller's error, as for a container
            job.files = copying.plan_files(task, [self.cold.probe()])
        with self.lock:
            self.jobs[job.handle] = job
        self.workers.submit(self._launch, job, plan)
        return job.handle

    def poll(self, handles: Sequence[str]) -> Dict[str, State]:
        if not self.watcher.stream_ok:
            # warm states come from the event stream: while it is down, an engine that
            # does not answer must count against the tolerance like a failed list would
            with engine_errors("checking the engine"):
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
                elif job.state is State.FINISHED and job.reason == DEAD_RUNNER:
                    states[h] = State.INTERRUPTED  # not the task's doing: it runs again
                else:
                    states[h] = job.state
        if by_container:
            for cid, state in self.cold.poll(list(by_container)).items():
                states[by_container[cid]] = state
        return states

    def stop(self, handle: str) -> None:
        job = self.jobs.get(handle)
        if job is None:
            return
        if job.cold:
            return self.cold.stop(job.cold)
        if job.runner is not None:
            self.containers.kill(job.runner)

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
            return self.cold.result(job.cold, task)
        if job.reason:
            ok, reason = False, job.reason
        else:
            state = {"ExitCode": job.exit_code, "OOMKilled": job.oom}
            ok, reason = engine.judge(state, task, job.memory)
            if launch.not_shared(job.exit_code, job.tail):
                reason = launch.not_shared_reason(engine.where(self.options), task.workdir)
        return TaskResult(
            ok=ok, exit_code=job.exit_code, reason=reason, stderr_tail=job.tail,
            log_files=job.log_files, seconds=job.seconds, usage=job.usage,
            out_of_memory=not ok and job.oom,
        )

    def release(self, handles: Sequence[str]) -> None:
        cold, runners = self._forget(handles, keep_ended=True)
        for runner in runners:
            self.containers.remove(runner)
        if cold:
            self.cold.cancel(cold)

    def cancel(self, handles: Sequence[str]) -> None:
        cold, runners = self._forget(handles, keep_ended=False)
        kept = [runner for runner in runners if not self.containers.remove(runner)]
        if cold:
            self.cold.cancel(cold)
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

    def close(self, detach: bool = False) -> None:
        """Remove every runner and the run's directory; with ``detach``, the runners of
        running tasks and the directory stay for a later run to adopt (left_execs.py)."""
        self.closed = self.containers.closed = True
        self.stopping.set()
        self.watcher.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if detach:
            with self.lock:
                busy = {job.runner.id for job in self.jobs.values()
                        if job.runner is not None and not job.ended}
            for runner in list(self.containers.by_id.values()):
                if runner.id not in busy:
                    self.containers.remove(runner)
            self.workers.shutdown(wait=True)
            self.api.close()
            return
        self.containers.remove_all(parallel=WORKERS)
        self.workers.shutdown(wait=True)
        self.containers.remove_all()  # started while closing
        self.containers.remove_root()
        self.api.close()

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
                volume = self.cold.mirror.mount() if job.files is not None else None
                runner = self.containers.acquire(key, task, mounts, host_config, volume)
                with self.lock:
                    if job.canceled:
                        self.containers.put_idle(runner)
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
                        self.watcher.remove_exec(job.exec_id)
                        job.exec_id = None
                    if runner is not None:
                        self.busy.pop(runner.id, None)
                        job.runner = None
                if runner is not None:
                    runner.retire = True
                    self.containers.remove(runner)
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
            handle = self.cold.submit(job.task)
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
                self.cold.cancel([handle])
                return
            job.error = None
            job.cold = handle

    def _exec(self, job: _Job, runner: Runner) -> None:
        if runner.copy:
            claim = self.cold.mirror.claim(job.task, job.files)
            sent = False
            try:
                copying.send_to_runner(self.api, runner, claim.outside, claim.inside)
                sent = True
            finally:
                self.cold.mirror.done(claim, sent)
        with engine_errors("starting a task"):
            exec_id = self.containers.create_exec(runner, job.task, self.cold.probe())
            if not runner.copy:  # a later run cannot read the record of a task run by copy
                # before it starts: a run that dies from now on leaves what a later one adopts
                left_execs.write_record(runner.host_dir, {
                    "key": self.images.key(job.task), "products": products_id(job.task),
                    "name": job.task.name, "exec": exec_id, "runner": runner.id, "started": time.time(),
                })
            with self.lock:
                job.exec_id = exec_id
                self.by_exec[exec_id] = job
            job.started = time.monotonic()
            self.watcher.add_exec(exec_id, runner.id)
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
            self.watcher.remove_exec(job.exec_id)
        if runner is not None:
            self.busy.pop(runner.id, None)
        try:
            self.workers.submit(self._collect, job, runner)
        except RuntimeError:  # shutting down: no logs to move any more
            job.state = State.FINISHED

    def _collect(self, job: _Job, runner: Optional[Runner]) -> None:
        """Move the exec's logs from the runner's scratch directory into the task's log
        directory, then report the task finished and recycle the runner."""
        try:
            if runner is not None and not job.canceled:
                if runner.copy:
                    try:
                        for warning in copying.collect_from_runner(self.api, runner, job.task):
                            self.cold.report(warning)
                        self.cold.mirror.took(job.task)
                    except BackendUnavailable:  # the engine went away with the runner: run again
                        runner.retire = True
                        job.reason = job.reason or DEAD_RUNNER
                    except CrankError as e:  # the products could not be had: the task failed
                        runner.retire = True
                        job.reason = job.reason or str(e)
                with job.live_lock:
                    job.log_files, job.tail = scratch.move_logs(runner.logs, job.task, job.live)
                reading = launch.reading(os.path.join(runner.logs, job.task.name + USAGE))
                job.usage = cgroup.usage(reading)
                # the runner's oom event comes late or not at all, now and then
                job.oom = job.oom or cgroup.oom_killed(reading)
            if (
                runner is not None and not runner.retire and not runner.oom and not job.reason
                and job.exit_code is not None and job.exit_code > 128
            ):
                # killed by a signal: with its runner (whose stop kills every process in
                # it, and whose own end Docker reports just after) if the runner stops
                if self.containers.stops_within(runner, DEAD_RUNNER_WAIT_S):
                    runner.dead = True
                    job.reason = DEAD_RUNNER
                # the runner's oom event can come after the exec's end: by now it has
                job.oom = job.oom or runner.oom
        finally:
            if runner is not None:
                left_execs.clear_record(runner.host_dir)  # reported by this run
            with self.lock:
                job.error = None
                job.state = State.FINISHED
            if runner is not None:
                self.containers.recycle(runner)

    def _running_logs(self):
        with self.lock:
            running = [job for job in self.busy.values() if job.state is State.RUNNING and not job.ended]
        return [(copying.log_reader(self.api, job.runner.id) if job.runner.copy
                 else scratch.host_reader(job.runner.logs), job.live, job.live_lock) for job in running]

    # ---- what the watcher reports (events.py) ------------------------------------------

    def _exited(self, exec_id: str, code: Optional[int]) -> None:
        with self.lock:
            job = self.by_exec.get(exec_id)
            if job is not None:
                self._finish(job, code)

    def _stopped(self, runner_id: str) -> None:
        with self.lock:
            runner = self.containers.by_id.get(runner_id)
            if runner is not None:
                self._runner_died(runner)

    def _lost(self, exec_id: str) -> None:
        with self.lock:
            job = self.by_exec.get(exec_id)
            if job is not None and not job.ended and job.runner is not None:
                job.runner.retire = True
                self._finish(job, None, "crank lost track of the task: the Docker engine no longer knows its exec")

    def _runner_died(self, runner: Runner) -> None:
        """A runner's container stopped (under the lock): its task, if any, ends now."""
        runner.dead = True
        job = self.busy.get(runner.id)
        if job is not None and job.exec_id:
            if runner.retire:
                self._finish(job, 137)  # crank killed it (wall time, cancel)
            else:
                self._finish(job, 137, DEAD_RUNNER)
        elif job is None:
            self.containers.idle_died(runner)
