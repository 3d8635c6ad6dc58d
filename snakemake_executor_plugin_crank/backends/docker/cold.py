"""One container per task: created with the task's mounts and limits, its command run as
its first process, its state read from one list of the run's containers per round."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors

from ...errors import BackendUnavailable, CrankError
from ...task import State, TaskResult, TaskSpec, file_argv, script_fits_argv
from .. import cgroup, logs
from ..adoption import products_id
from . import copying, engine, launch
from .engine import (LABEL_FILES, LABEL_KEY, LABEL_PRODUCTS, LABEL_RUN, LABEL_WORKDIR, DockerOptions,
                     engine_errors, short)
from .images import Images
from .follow import Follower
from .mirror import Mirror
from .mounts import plan_mounts
from .sharing import Sharing

# clients' connections kept for following containers' logs (two streams each)
FOLLOW_POOL = 256
# a container's logs are followed once it has run this long (live logs within about 5 s)
FOLLOW_AFTER_S = 2.0

# a stopping engine goes silent within moments of stopping its containers (about 0.3 s
# measured on dockerd 20.10; more under load)
ENGINE_GONE_S = 5.0

_STATES = {
    "created": State.QUEUED,
    "restarting": State.RUNNING,
    "running": State.RUNNING,
    "paused": State.RUNNING,
    "removing": State.FINISHED,
    "exited": State.FINISHED,
    "dead": State.FINISHED,
}


def scripts_root(workdir: str) -> str:
    """Where the scripts too long for a container's argv are written, and where the
    containers write what they used (launch.py), a directory per run."""
    return os.path.join(workdir, ".snakemake", "crank", "scripts")


class ColdContainers:
    """Runs each task as a container of its own; its handle is the container's id."""

    def __init__(self, api, run_id: str, workdir: str, options: DockerOptions, images: Images,
                 report: Callable[[str], None]):
        self.api = api
        self.run_id = run_id
        self.workdir = workdir
        self.options = options
        self.images = images
        self.report = report
        self.script_dirs: set = set()  # the runs' directories under scripts_root
        self.run_dir = os.path.join(scripts_root(workdir), run_id)
        self.taken: set = set()  # containers of dead runs this run took over
        # when the engine did not answer (this machine's clock, from the last answer before to
        # the first after): what a signal ended about then, the engine stopped (_signalled)
        self.outages: List[Tuple[float, float]] = []
        self._last_answer: Optional[float] = None
        self._silent_since: Optional[float] = None
        # by handle, when the container was last known running (started, taken over, or so
        # listed), and when a listing first showed it ended by a signal crank did not send
        self._seen_running: Dict[str, float] = {}
        self._seen_signalled: Dict[str, float] = {}
        self._stopped_here: set = set()
        self.followers: Dict[str, Follower] = {}  # the logs of running containers (follow.py)
        # tasks started, not followed yet: (when, task), by handle
        self._unfollowed: Dict[str, Tuple[float, TaskSpec]] = {}
        self._probe: Optional[str] = None  # launch.py: what every container must see
        self._follow_api = None
        # whether a task's files are bound or copied (sharing.py, copying.py)
        self.sharing = Sharing(api, options, run_id, workdir, self.probe, report)
        self.mirror = Mirror(api, run_id, workdir)  # the engine's copy of the workdir, when copied

    def submit(self, task: TaskSpec) -> str:
        """Start the task as a container of its own."""
        self.images.ensure(task.image)
        copy = self.sharing.copies(task)
        plan = [] if copy else plan_mounts(
            task.workdir, [i.path for i in task.inputs], [o.path for o in task.products]
        )
        host_config = engine.host_config_for(self.options, task, plan)
        name = f"crank-{self.run_id[:8]}-{task.name}"
        try:
            if copy:
                host_config["mounts"] = [*host_config.get("mounts", ()), self.mirror.mount()]
            with engine_errors("creating a container"):
                handle = self._create(task, name, host_config, copy)  # writes a long script
            if copy:
                claim = self.mirror.claim(task, copying.plan_files(task, self._crank_files(task)))
                sent = False
                try:
                    copying.put_in(self.api, handle, claim.outside + claim.inside)  # inside: into the volume
                    sent = True
                finally:
                    self.mirror.done(claim, sent)
            with engine_errors("starting a container"):
                self.api.start(handle)
        except (docker.errors.DockerException, TypeError) as e:
            self._remove_quietly(name)
            raise CrankError(self._refusal(task, e)) from None
        except (BackendUnavailable, CrankError):
            # the engine may have made the container before the connection broke
            self._remove_quietly(name)
            raise
        self._unfollowed[handle] = (time.monotonic(), task)
        self._seen_running[handle] = time.time()
        return handle

    def take(self, handle: str) -> None:
        """A dead run's container, taken over by this run."""
        self.taken.add(handle)
        self._seen_running[handle] = time.time()

    def _follow_long_ones(self, states: Mapping[str, State]) -> None:
        """Follow the logs of containers running for FOLLOW_AFTER_S: most jobs end sooner
        and cost no log stream; a follower's first read brings what came before."""
        now = time.monotonic()
        for handle, state in states.items():
            started = self._unfollowed.get(handle)
            if started is None or (state is State.RUNNING and now - started[0] < FOLLOW_AFTER_S):
                continue
            if state is not State.RUNNING:
                del self._unfollowed[handle]
                continue
            try:
                if self._follow_api is None:  # streams held for a container's life: a client of their own
                    self._follow_api = engine.client(self.options, max_pool_size=FOLLOW_POOL,
                                                     version=self.api.api_version).api
                self.followers[handle] = Follower(self._follow_api, handle, started[1])
            except Exception:  # noqa: BLE001 - live logs only: tried again next round
                continue
            del self._unfollowed[handle]

    def _refusal(self, task: TaskSpec, error: Exception) -> str:
        """Docker's refusal of a container, explained when the cause is known."""
        text = short(error)
        if task.resources.gpus and "device driver" in text:
            return (
                f"{task.label} asks for gpu={task.resources.gpus} but the Docker engine has no "
                f"NVIDIA runtime ({text}); install the NVIDIA Container Toolkit on the engine's "
                "host, or run the rule without the gpu resource"
            )
        if "bind source path does not exist" in text:
            return (f"Docker refused the container for {task.label}: {text}. The engine at "
                    f"{engine.where(self.options)} does not have that path of this machine: it runs on "
                    "another machine or in other mounts; run crank with an engine on this machine, "
                    "or use the TES backend")
        network = self.options.network
        if "network" in text and network in text and "not found" in text:
            return engine.missing_network(network, self.options.hints)
        return f"Docker refused the container for {task.label}: {text}"

    def command_for(self, task: TaskSpec) -> Tuple[str, ...]:
        """The container's argv: the launcher around the script, which travels as one
        argument or, when it is too long for one, as a file under the workdir, which the
        container sees with the workdir (mounted, or copied in with the task's files)."""
        probe = self.probe()
        argv = task.argv
        if not script_fits_argv(task.script):
            try:
                # in the workdir, where jobs write: never through a symlink one put there
                dir_fd = logs.open_dir(self.run_dir, task.workdir)
                try:
                    with os.fdopen(logs.create_file(dir_fd, task.name + ".sh"), "w") as f:
                        f.write(task.script)
                finally:
                    os.close(dir_fd)
            except OSError as e:
                raise CrankError(f"{task.label}: cannot write its script under {self.run_dir!r} "
                                 f"({logs.why(e)})") from None
            argv = file_argv(os.path.join(self.run_dir, task.name + ".sh"))
        return launch.cold_argv(probe, self._usage_file(task), argv)

    def _usage_file(self, task: TaskSpec) -> str:
        return os.path.join(self.run_dir, task.name + ".usage")

    def _crank_files(self, task: TaskSpec) -> List[str]:
        """What the container of a task whose files are copied needs of crank's: the probe,
        and the script when it travels as a file."""
        script = os.path.join(self.run_dir, task.name + ".sh")
        return [self.probe()] + ([script] if not script_fits_argv(task.script) else [])

    def probe(self) -> str:
        """The file every container of the run must see at its path (launch.py), made once
        with the run's directory, where containers also write what they used."""
        if self._probe is None:
            name = f"probe-{uuid.uuid4().hex}"
            try:
                dir_fd = logs.open_dir(self.run_dir, self.workdir)
                self.script_dirs.add(self.run_dir)
                try:
                    os.close(logs.create_file(dir_fd, name))
                finally:
                    os.close(dir_fd)
            except OSError as e:
                raise CrankError(f"cannot write under {self.run_dir!r} ({logs.why(e)})") from None
            self._probe = os.path.join(self.run_dir, name)
        return self._probe

    def _create(self, task: TaskSpec, name: str, host_config: Dict[str, Any], copy: bool) -> str:
        config = dict(
            image=task.image,
            command=list(self.command_for(task)),
            working_dir=task.workdir,
            user=f"{os.getuid()}:{os.getgid()}",
            environment=launch.environment(task.env),
            labels={**engine.labels(self.run_id, task.job_id, self.workdir),
                    LABEL_KEY: self.images.key(task), LABEL_PRODUCTS: products_id(task),
                    LABEL_FILES: "copy" if copy else "bind"},
            name=name,
            host_config=self.api.create_host_config(**host_config),
        )
        return engine.create_container(self.api, config)

    def _remove_quietly(self, name: str) -> None:
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            self.cancel([name])

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        try:
            if self.taken.intersection(handles):  # labeled with the runs that made them
                rows = engine.containers(self.api, LABEL_WORKDIR, self.workdir)
            else:
                rows = engine.containers(self.api, LABEL_RUN, self.run_id)
        except BackendUnavailable:
            if self._silent_since is None:
                self._silent_since = self._last_answer or time.time()
            raise
        now = time.time()
        if self._silent_since is not None:
            self.outages.append((self._silent_since, now))
            self._silent_since = None
        self._last_answer = now
        seen = {row["Id"]: _STATES.get(row["State"], State.RUNNING) for row in rows}
        signalled = {row["Id"] for row in rows if engine.ended_by_signal(row)}
        states = {h: seen.get(h, State.LOST) for h in handles}
        self._follow_long_ones(states)
        for h, state in states.items():
            if state in (State.RUNNING, State.QUEUED):
                self._seen_running[h] = now
            elif state is State.FINISHED and h in signalled and h not in self._stopped_here:
                states[h] = self._signalled(h, now)
        return states

    def _signalled(self, handle: str, now: float) -> State:
        """A container a signal crank did not send ended: INTERRUPTED when the engine stopped
        it (live-restore off: a stopping or restarting engine stops every container), else
        FINISHED, the job's own end. A stopping engine still answers while it stops its
        containers and goes silent moments later: the engine stopped the container when a
        silence overlaps the time from when it was last known running to ENGINE_GONE_S after
        a listing first showed it ended. Until then it counts as running. The OOM killer's
        kill stays the job's own."""
        first = self._seen_signalled.setdefault(handle, now)
        since = self._seen_running.get(handle, first)
        if any(start <= first + ENGINE_GONE_S and end > since for start, end in self.outages):
            try:
                with engine_errors("inspecting a container"):
                    killed_for_memory = self.api.inspect_container(handle)["State"].get("OOMKilled")
            except docker.errors.NotFound:
                return State.FINISHED
            return State.FINISHED if killed_for_memory else State.INTERRUPTED
        return State.RUNNING if now < first + ENGINE_GONE_S else State.FINISHED

    def stop(self, handle: str) -> None:
        self._stopped_here.add(handle)
        try:
            with engine_errors("stopping a container"):
                self.api.kill(handle)
        except docker.errors.APIError:
            pass  # already ended

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        try:
            with engine_errors("inspecting a container"):
                inspected = self.api.inspect_container(handle)
        except docker.errors.NotFound:
            return TaskResult(ok=False, reason="the container was removed outside crank")
        state = inspected["State"]
        self._unfollowed.pop(handle, None)
        follower = self.followers.pop(handle, None)
        if follower is not None:
            follower.stop()
        with engine_errors("reading a container's logs"):
            stdout = self.api.logs(handle, stdout=True, stderr=False, stream=True)
            stderr = self.api.logs(handle, stdout=False, stderr=True, stream=True)
            files, tail = logs.save_logs(task, stdout, stderr, follower.live if follower else {})
        labels = (inspected.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_FILES) == "copy":
            for warning in copying.take_products(self.api, handle, task):
                self.report(warning)
            if labels.get(LABEL_RUN) == self.run_id:  # a dead run's container has its own volume
                self.mirror.took(task)
            data = copying.read_small(self.api, handle, self._usage_file(task), launch.READ_AT_MOST)
            reading = (data or b"").decode(errors="replace")
        else:
            reading = launch.reading(self._usage_file(task))
        usage = cgroup.usage(reading)
        if cgroup.oom_killed(reading):
            state = {**state, "OOMKilled": True}
        limit = (inspected.get("HostConfig") or {}).get("Memory")
        ok, reason = engine.judge(state, task, limit)
        if launch.not_shared(state.get("ExitCode"), tail):
            reason = launch.not_shared_reason(engine.where(self.options), task.workdir)
        return TaskResult(
            ok=ok,
            exit_code=state.get("ExitCode"),
            reason=reason,
            stderr_tail=tail,
            log_files=files,
            seconds=engine.running_seconds(state),
            usage=usage,
            out_of_memory=not ok and bool(state.get("OOMKilled")),
        )

    def cancel(self, handles: Sequence[str]) -> None:
        """Remove the containers, running or not (also what ``release`` does)."""
        for handle in handles:
            self._unfollowed.pop(handle, None)
            self._seen_running.pop(handle, None)
            self._seen_signalled.pop(handle, None)
            self._stopped_here.discard(handle)
            follower = self.followers.pop(handle, None)
            if follower is not None:
                follower.stop()
            engine.remove_container(self.api, handle)

    def close(self, detach: bool = False) -> None:
        """Remove every container of the run (with ``detach``, only those that ended),
        then the scripts written for it."""
        if detach:
            self.mirror.close()  # the volume stays while a container left running uses it
            return  # the containers may read their scripts: both stay
        try:
            rows = engine.containers(self.api, LABEL_RUN, self.run_id)
            self.cancel([row["Id"] for row in rows] + sorted(self.taken))
            self.mirror.close()
            if self.taken:  # the volumes of the runs that left them, if they copied
                self.mirror.remove_left_volumes()
        finally:
            for directory in self.script_dirs:
                shutil.rmtree(directory, ignore_errors=True)
            if self._follow_api is not None:
                self._follow_api.close()
