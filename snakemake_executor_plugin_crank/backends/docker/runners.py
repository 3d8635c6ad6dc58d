"""Warm runners themselves: a container made with a task's environment whose first
process waits forever, its private /tmp, /dev/shm and log scratch directories, the exec
that runs a task in it, whether it is still as clean as it started, and its removal;
and the run's runners, idle ones kept per environment for the next task.

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
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors
import docker.types
import requests

from ...errors import CrankError
from ...task import TaskSpec
from ..paths import under
from . import copying, engine, launch, scratch
from .engine import LOGS, DockerOptions, engine_errors
from .mounts import plan_mounts

PRIVATE = ("/tmp", "/dev/shm")
# the suffix of the file there with what the task used (launch.py)
USAGE = ".usage"


@dataclass(eq=False)
class Runner:
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
    # its tasks' files are copied in and out (copying.py): what it was sent (path -> what
    # the file was on the client), the paths its tasks made, the directories on the way
    copy: bool = False
    sent: Dict[str, Any] = field(default_factory=dict)
    made: set = field(default_factory=set)
    dirs: set = field(default_factory=set)
    jobs: int = 0


@dataclass
class PoolStats:
    runners_started: int = 0
    runners_removed: int = 0
    execs: int = 0
    cold: int = 0
    reasons: Dict[str, int] = field(default_factory=collections.Counter)


def environment(
    task: TaskSpec, options: DockerOptions, user: str, copy: bool = False
) -> Optional[Tuple[str, List[Tuple[str, bool]], Dict[str, Any]]]:
    """(key, mounts, host config) of the runner the task can run in, else None. Runners
    of the same key are interchangeable: all a container fixes when it is created. With
    ``copy`` the task's files are copied (copying.py): nothing is mounted."""
    if task.resources.gpus:
        return None
    mounts = [] if copy else plan_mounts(
        task.workdir, [i.path for i in task.inputs], [o.path for o in task.products]
    )
    if any(under(private, path) for path, _ in mounts for private in PRIVATE + (LOGS,)):
        return None  # a mount at or above /tmp or /dev/shm: keep Docker's own
    host_config = engine.host_config_for(options, task, mounts)
    key = json.dumps(
        [task.image, user, mounts, {k: v for k, v in host_config.items() if k != "mounts"}, copy],
        sort_keys=True, default=str,
    )
    return key, mounts, host_config


class Runners:
    """The run's runner containers: started, handed out, taken back idle when as clean as
    a fresh one, removed. ``lock`` is the pool's (a runner moves between the pool's busy
    runners and the idle ones here at once); the watcher learns which runners are idle."""

    def __init__(self, api, run_id: str, workdir: str, base_url: Optional[str], lock,
                 watcher, workers: ThreadPoolExecutor, stats: PoolStats):
        self.api = api
        self.run_id = run_id
        self.workdir = workdir
        self.base_url = base_url
        self.lock = lock
        self.watcher = watcher
        self.workers = workers
        self.stats = stats
        self.user = f"{os.getuid()}:{os.getgid()}"
        self.counter = itertools.count()
        self.root: Optional[str] = None  # made with the first runner
        self.by_id: Dict[str, Runner] = {}
        self.idle: Dict[str, List[Runner]] = collections.defaultdict(list)
        self.closed = False

    def acquire(self, key: str, task: TaskSpec, mounts: Sequence[Tuple[str, bool]],
                host_config: Mapping[str, Any], volume: Optional[docker.types.Mount] = None) -> Runner:
        """An idle runner of the environment ``key``, else a new one. With ``volume`` (the
        engine's copy of the workdir: mirror.py) the task's files are copied, and the runner
        holds nothing at the task's products outside the workdir."""
        copy = volume is not None
        with self.lock:
            idle = self.idle[key]
            for runner in reversed([r for r in idle if not r.dead and (not copy or copying.fits(r, task))]):
                idle.remove(runner)
                self.watcher.remove_idle(runner.id)
                return runner
        runner = self._start(self.make_root(), key, task, mounts, host_config, volume)
        with self.lock:
            self.by_id[runner.id] = runner
        self.stats.runners_started += 1
        if self.closed:
            self.remove(runner)
            raise CrankError("crank is shutting down")
        return runner

    def make_root(self) -> str:
        """The run's temporary directory, with a file naming its owner, so that a later
        run can tell it stale when this one was killed hard (backend.gather_orphans)."""
        with self.lock:
            if self.root is None:
                self.root = scratch.make_root(self.workdir, self.base_url, self.run_id)
            return self.root

    def put_idle(self, runner: Runner) -> None:
        """(under the lock) Ready for the next task of its environment."""
        self.idle[runner.key].append(runner)
        self.watcher.add_idle(runner.id)

    def recycle(self, runner: Runner) -> None:
        """Back to the idle runners if it is as clean as a fresh one, else removed."""
        if runner.retire or runner.dead or runner.oom or self.closed:
            reason = "killed, dead or out of memory"
        else:
            reason = self._unclean(runner)
        if reason is not None:
            self.stats.reasons[reason] += 1
            runner.retire = True
            self.remove(runner)
            return
        with self.lock:
            if not (runner.retire or runner.dead or self.closed):
                self.put_idle(runner)
                return
        self.remove(runner)

    def oom(self, runner_id: str) -> None:
        """A process in the runner ran out of memory (its task, if any, did)."""
        with self.lock:
            runner = self.by_id.get(runner_id)
            if runner is not None:
                runner.oom = True

    def idle_died(self, runner: Runner) -> None:
        """(under the lock) An idle runner's container stopped: it is removed."""
        for idle in self.idle.values():
            if runner in idle:
                idle.remove(runner)
                self.watcher.remove_idle(runner.id)
                with contextlib.suppress(RuntimeError):
                    self.workers.submit(self.remove, runner)

    def remove(self, runner: Runner) -> bool:
        """Remove a runner; False when the engine did not (it stays for the next start's
        orphan removal, with its directory, whose owner file names this run)."""
        with self.lock:
            known = self.by_id.pop(runner.id, None)
            for idle in self.idle.values():
                if runner in idle:
                    idle.remove(runner)
            self.watcher.remove_idle(runner.id)
        if known is None:
            return True
        if not self._remove_container(runner):
            return False
        self.stats.runners_removed += 1
        return True

    def remove_all(self, parallel: int = 1) -> None:
        """Every runner, ``parallel`` removals at a time (each costs the engine a few
        tenths of a second)."""
        with ThreadPoolExecutor(parallel) as removers:
            list(removers.map(self.remove, list(self.by_id.values())))

    def remove_root(self) -> None:
        if self.root is not None:
            scratch.rmtree(self.root)

    def _start(self, root: str, key: str, task: TaskSpec, mounts: Sequence[Tuple[str, bool]],
               host_config: Mapping[str, Any], volume: Optional[docker.types.Mount] = None) -> Runner:
        """A new runner for the environment ``key``, running, its file system noted; a
        failure leaves neither container nor directory. With ``volume`` (its tasks' files are
        copied) it mounts that at the workdir, its /tmp and log scratch directory are its own
        (emptied from inside), and logs come out by copy."""
        copy = volume is not None
        host_dir = tempfile.mkdtemp(dir=root)
        binds = [volume] if copy else []
        keep = {}
        for private in () if copy else PRIVATE:
            path = os.path.join(host_dir, private.strip("/").replace("/", "-"))
            os.mkdir(path)
            os.chmod(path, 0o1777)
            binds.append(docker.types.Mount(target=private, source=path, type="bind"))
            keep[path] = tuple(
                os.path.relpath(p, private) for p, _ in mounts if under(p, private) and p != private
            )
        logs = os.path.join(host_dir, "logs")
        os.mkdir(logs, 0o700)
        if not copy:
            binds.append(docker.types.Mount(target=LOGS, source=logs, type="bind"))
        config = dict(host_config)
        config["mounts"] = list(config["mounts"]) + binds
        name = f"crank-{self.run_id[:8]}-warm-{next(self.counter)}"
        try:
            with engine_errors("creating a container"):
                cid = self.api.create_container(
                    image=task.image,
                    command=["/bin/sh", "-c", launch.IDLE],
                    user=self.user,
                    labels=engine.labels(self.run_id, "", self.workdir),
                    name=name,
                    host_config=self.api.create_host_config(**config),
                )["Id"]
        except Exception:
            # the engine may have made it before the connection broke
            with contextlib.suppress(CrankError):
                engine.remove_container(self.api, name)
            scratch.rmtree(host_dir)
            raise
        runner = Runner(cid, key, host_dir, keep, logs=logs, copy=copy)
        try:
            if copy:
                engine.put_files(self.api, cid, copying.scratch_dir(self.user))
            with engine_errors("starting a container"):
                self.api.start(cid)
                runner.baseline = self.changes(cid)
        except Exception:
            runner.retire = True
            self._remove_container(runner)
            raise
        return runner

    def create_exec(self, runner: Runner, task: TaskSpec, probe: str) -> str:
        """The exec that runs ``task`` in ``runner``, not started yet; ``probe``: the file
        it must see (launch.py)."""
        logs = f"{LOGS}/{task.name}"
        command = launch.warm_argv(logs + ".stdout", logs + ".stderr", logs + ".rc", probe,
                                   logs + USAGE, task.argv)
        return self.api.exec_create(
            runner.id, list(command), environment=launch.environment(task.env), workdir=task.workdir,
            user=self.user,
        )["Id"]

    def _unclean(self, runner: Runner) -> Optional[str]:
        """Why the runner may not run another task (its file system changed, /tmp could
        not be emptied), else None after emptying its private directories."""
        if runner.copy and not self._emptied_inside(runner):
            return "could not empty /tmp"
        try:
            changes = self.changes(runner.id)
            if runner.copy:
                copying.forget_missing(runner, {path for path, _ in changes})
                changes = tuple(c for c in changes if c not in runner.baseline and not copying.expected(runner, c[0]))
                if changes:
                    return "its file system changed"
            elif changes != runner.baseline:
                return "its file system changed"
        except Exception:  # noqa: BLE001
            return "changes unknown"
        try:
            for path, keep in runner.keep.items():
                scratch.empty(path, keep)
            scratch.empty(runner.logs, (), mode=0o700)
        except OSError:
            return "could not empty /tmp"
        return None

    def _emptied_inside(self, runner: Runner) -> bool:
        """Empty the scratch directories of a runner whose tasks' files are copied, by an
        exec in it (they are its own, not the client's)."""
        try:
            with engine_errors("emptying a runner's /tmp"):
                command = ["/bin/sh", "-c", copying.empty_command(self.workdir)]
                emptied = engine.exit_code_of(self.api, runner.id, command, self.user) == 0
        except Exception:  # noqa: BLE001 - the runner is not reused
            return False
        copying.forget_scratch(runner)
        return emptied

    def changes(self, cid: str) -> Tuple[Tuple[str, int], ...]:
        return tuple(sorted((c["Path"], c["Kind"]) for c in self.api.diff(cid) or ()))

    def _remove_container(self, runner: Runner) -> bool:
        """Remove a runner's container, then its directory; False when the engine did not."""
        try:
            engine.remove_container(self.api, runner.id)
        except CrankError:  # refused, or no answer
            return False
        scratch.rmtree(runner.host_dir)
        return True

    def kill(self, runner: Runner) -> None:
        """Kill the runner and its task; an engine that does not answer raises (the
        runner tries the stop again)."""
        runner.retire = True
        with contextlib.suppress(docker.errors.APIError):  # already ended
            with engine_errors("stopping a container"):
                self.api.kill(runner.id)

    def stops_within(self, runner: Runner, seconds: float) -> bool:
        """Whether the runner's container stops (or is gone) within ``seconds``: one
        request that the engine answers when it stops."""
        if runner.dead:
            return True
        try:
            self.api.wait(runner.id, timeout=seconds)
            return True
        except docker.errors.NotFound:
            return True
        except requests.exceptions.ReadTimeout:
            return runner.dead  # still running
        except requests.exceptions.ConnectionError:
            return True  # the engine went away: it stops its containers as it goes
        except Exception:  # noqa: BLE001 - no answer
            return runner.dead

