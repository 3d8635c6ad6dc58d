"""Docker backend: each task is one container on a local or remote Docker engine.

Files are not copied: the workdir is bind-mounted at its own path (read-write), inputs
outside it read-only at theirs, so the command sees the host's paths.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors
import docker.types
import requests

from ..errors import BackendUnavailable, CrankError, ImageUnavailable
from ..task import Capacity, State, TaskResult, TaskSpec, file_argv, script_fits_argv
from . import logs
from .paths import under
from .stamps import seconds_between

LABEL_RUN = "crank.run"
LABEL_JOB = "crank.job"
LABEL_WORKDIR = "crank.workdir"

# Docker refuses memory limits below 6 MB.
DOCKER_MIN_MEMORY = 6 * 1024 * 1024
# the start-up check: an engine that accepts connections but never answers is reported
# quickly; later requests keep the SDK's longer timeout (pulls, large logs)
STARTUP_TIMEOUT_S = 10

_STATES = {
    "created": State.QUEUED,
    "restarting": State.RUNNING,
    "running": State.RUNNING,
    "paused": State.RUNNING,
    "removing": State.FINISHED,
    "exited": State.FINISHED,
    "dead": State.FINISHED,
}


@dataclass(frozen=True)
class DockerOptions:
    base_url: Optional[str] = None
    network: str = "bridge"
    pull: str = "missing"
    host_config: Mapping[str, Any] = field(default_factory=dict)
    # run tasks by exec in warm containers where that is safe (backends/warm.py)
    warm: bool = False


# handles of tasks run by the warm pool
WARM_PREFIX = "warm:"


def _is_warm(handle: str) -> bool:
    return handle.startswith(WARM_PREFIX)


# read-only mounts for inputs outside the workdir before inputs of a directory share
# one mount of it: thousands of mounts make a container slow to create and start
MAX_INPUT_MOUNTS = 32
# never mounted as a whole for inputs in them: the image's own (system) directories
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
               "/proc", "/run", "/sbin", "/sys", "/usr", "/var")


def plan_mounts(
    workdir: str, inputs: Sequence[str], outputs: Sequence[str]
) -> List[Tuple[str, bool]]:
    """Bind mounts (path, writable) that make every input and output visible at its
    own absolute path: the workdir read-write, the directories of outputs outside it
    read-write, inputs outside both read-only (symlinks followed to their target).

    Inputs are mounted one by one up to MAX_INPUT_MOUNTS; beyond, directories holding
    several of them are mounted instead (see _merged). O(n log n) for n paths (times
    their depth)."""
    writable = _outermost([workdir] + [os.path.dirname(out) for out in outputs])
    candidates = []
    real_dirs: Dict[str, str] = {}
    for path in inputs:
        candidates.append(path)
        real = _realpath(path, real_dirs)
        if real != path:
            candidates.append(real)
    readonly = _outermost([p for p in candidates if not _covered(p, writable)])
    if len(readonly) > MAX_INPUT_MOUNTS:
        readonly = _merged(readonly, writable)
    return [(p, True) for p in writable] + [(p, False) for p in readonly]


def _realpath(path: str, real_dirs: Dict[str, str]) -> str:
    """os.path.realpath, resolving each directory once for all the files in it."""
    parent, name = os.path.split(path)
    if name in ("", os.curdir, os.pardir) or os.path.islink(path):
        return os.path.realpath(path)
    if parent not in real_dirs:
        real_dirs[parent] = os.path.realpath(parent)
    return os.path.join(real_dirs[parent], name)


def _key(path: str) -> Tuple[str, ...]:
    # sorted by this, a directory comes right before everything under it
    return tuple(path.rstrip("/").split("/"))


def _outermost(paths: Sequence[str]) -> List[str]:
    """The paths not under another one of them, sorted (see _key)."""
    kept: List[str] = []
    for path in sorted(set(paths), key=_key):
        if not kept or not under(path, kept[-1]):
            kept.append(path)
    return kept


def _covered(path: str, mounts: Sequence[str]) -> bool:
    """``path`` is under one of ``mounts`` (outermost, sorted by _key)."""
    at = bisect.bisect_right(mounts, _key(path), key=_key)
    return at > 0 and under(path, mounts[at - 1])


def _holds(directory: str, mounts: Sequence[str]) -> bool:
    """One of ``mounts`` (sorted by _key) is ``directory`` or lies below it."""
    at = bisect.bisect_left(mounts, _key(directory), key=_key)
    return at < len(mounts) and under(mounts[at], directory)


def _merged(readonly: List[str], writable: List[str]) -> List[str]:
    """Fewer read-only mounts: directories holding several of them mount instead, the
    deepest first, until MAX_INPUT_MOUNTS are left or no directory may be mounted. Never
    mounted so: ``/`` or a top-level directory, a system directory, the user's home, a
    directory holding the workdir or an output directory (it would be read-only there)."""
    home = os.path.expanduser("~")

    @functools.lru_cache(maxsize=None)
    def mountable(directory: str) -> bool:
        return not (
            directory.count("/") < 2 or directory == home
            or any(under(directory, d) for d in SYSTEM_DIRS) or _holds(directory, writable)
        )

    def ancestors(path: str):
        """The directories above ``path`` that may be mounted, the nearest first (those
        above one that may not, may not either: they hold it)."""
        while True:
            path = os.path.dirname(path)
            if not mountable(path):
                return
            yield path

    chains = {m: list(ancestors(m)) for m in readonly}
    holding = collections.Counter(d for chain in chains.values() for d in chain)
    left = len(readonly)
    chosen = set()
    for directory in sorted(holding, key=lambda d: (-d.count("/"), d)):
        if left <= MAX_INPUT_MOUNTS:
            break
        k = holding[directory]
        if k < 2:
            continue
        chosen.add(directory)
        left -= k - 1
        for above in ancestors(directory):
            holding[above] -= k - 1

    def mount_for(path: str) -> str:
        return next((d for d in reversed(chains[path]) if d in chosen), path)

    return _outermost([mount_for(m) for m in readonly])


def gpu_request(count: int, visible: Optional[str]) -> docker.types.DeviceRequest:
    """NVIDIA devices for ``count`` GPUs, taken from CUDA_VISIBLE_DEVICES when set."""
    if visible is not None and visible.strip() not in ("", "all"):
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        if count > len(ids):
            raise CrankError(
                f"{count} GPU(s) requested but CUDA_VISIBLE_DEVICES lists only {len(ids)}"
            )
        return docker.types.DeviceRequest(device_ids=ids[:count], capabilities=[["gpu"]])
    return docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])


def memory_limit_text(limit_bytes: Optional[int], task: TaskSpec) -> str:
    """The limit the container really had, in decimal MB, and the request when Docker's
    floor raised it."""
    asked = task.resources.mem_mb
    if not limit_bytes:
        return f" (limit {asked} MB)" if asked else ""
    real = limit_bytes / 1_000_000
    text = f"{real:.0f}" if real == int(real) else f"{real:.2f}"
    if asked and asked * 1_000_000 < limit_bytes:
        return f" (limit {text} MB, Docker's minimum; mem_mb={asked} was asked)"
    return f" (limit {text} MB)"


def failure_reason(
    state: Mapping[str, Any], task: TaskSpec, limit_bytes: Optional[int] = None
) -> Optional[str]:
    if state.get("OOMKilled"):
        limit = memory_limit_text(limit_bytes, task)
        if state.get("ExitCode") == 0:
            # a child was killed but the command chose to go on and exit 0: the exit
            # code decides, as with Snakemake's local executor (docs/reliability.md)
            return f"a process was killed: out of memory{limit}; the command still exited 0"
        return f"killed: out of memory{limit}"
    code = state.get("ExitCode")
    if state.get("Error"):
        return state["Error"]
    if isinstance(code, int) and code > 128:
        # a command may also exit with such a code itself
        return f"likely killed by signal {code - 128}"
    return None


def judge(
    state: Mapping[str, Any], task: TaskSpec, limit_bytes: Optional[int] = None
) -> Tuple[bool, Optional[str]]:
    """Whether the task succeeded, and the reason to report: an OOM kill with exit code 0
    keeps the success (the reason is then a warning)."""
    reason = failure_reason(state, task, limit_bytes)
    ok = state.get("ExitCode") == 0 and (not reason or bool(state.get("OOMKilled")))
    return ok, reason


def running_seconds(state: Mapping[str, Any]) -> Optional[float]:
    """FinishedAt - StartedAt of an inspected container."""
    return seconds_between(state.get("StartedAt"), state.get("FinishedAt"))


# what the engine says when the registry answered that the image is not there for us
_REGISTRY_REFUSALS = (
    "not found", "manifest unknown", "name unknown", "pull access denied", "unauthorized",
    "denied:", "repository does not exist",
)
# answered with status 500 by the engine, yet final: asking again cannot help
_FINAL_SERVER_ERRORS = ("could not select device driver", "invalid reference format")


@contextlib.contextmanager
def engine_errors(doing: str):
    """Turn the engine's transport and server errors into BackendUnavailable; its
    refusals (4xx) stay APIError for the caller to explain."""
    try:
        yield
    except docker.errors.APIError as e:  # also a requests error: test it first
        if e.is_server_error() and not any(final in str(e) for final in _FINAL_SERVER_ERRORS):
            raise BackendUnavailable(f"the Docker engine failed while {doing} ({_short(e)})") from None
        raise
    except requests.RequestException as e:
        raise BackendUnavailable(f"the Docker engine did not answer while {doing} ({_short(e)})") from None


class DockerBackend:
    def __init__(
        self, run_id: str, workdir: str, options: DockerOptions = DockerOptions(),
        report: Optional[Callable[[str], None]] = None,
    ):
        self.run_id = run_id
        self.workdir = workdir
        self.options = options
        self.report = report or (lambda line: None)  # what the user should know now
        self._pull_failures: set = set()  # images whose failed pull was reported
        self._script_dirs: set = set()  # where scripts too long for argv were written
        where = options.base_url or os.environ.get("DOCKER_HOST") or "the default socket"
        silent = (
            f"the Docker engine at {where} accepted the connection but did not answer "
            f"within {STARTUP_TIMEOUT_S} s; check that this address is a Docker engine "
            "and that it is not stuck (restart it)"
        )
        try:
            # a short timeout for the first requests (the SDK asks the version at once)
            self.client = self._client(timeout=STARTUP_TIMEOUT_S)
            self.api = self.client.api
            timeout = docker.constants.DEFAULT_TIMEOUT_SECONDS
            try:
                self.api.ping()  # cheap: a busy engine still answers it at once
            except requests.Timeout:
                raise CrankError(silent) from None
            finally:
                self.api.timeout = timeout
            info = self.api.info()
        except docker.errors.DockerException as e:
            if "timed out" in str(e):
                raise CrankError(silent) from None
            if "Invalid bind address" in str(e) or "scheme" in str(e).lower():
                raise CrankError(
                    f"--crank-docker-url / DOCKER_HOST {where!r} is not a Docker engine "
                    "address; use unix:///path/to/docker.sock or tcp://host:port"
                ) from None
            raise BackendUnavailable(f"cannot reach the Docker engine at {where} ({_short(e)})") from None
        except requests.RequestException as e:
            raise BackendUnavailable(
                f"cannot reach the Docker engine at {where} ({_short(e)})"
            ) from None
        self._capacity = Capacity(
            cpus=info.get("NCPU"), mem_mb=int(info.get("MemTotal", 0) / 1e6) or None
        )
        self._images: set = set()
        self.warm = None
        if options.warm:
            from .warm import WarmPool

            self.warm = WarmPool(self, self._new_api)

    def _client(self, **kwargs) -> docker.DockerClient:
        """A client of the engine the options name (else DOCKER_HOST, else the socket)."""
        if self.options.base_url:
            return docker.DockerClient(base_url=self.options.base_url, **kwargs)
        return docker.from_env(**kwargs)

    def _new_api(self, pool_size: int):
        """Another client of the same engine (the warm pool's threads use their own)."""
        return self._client(max_pool_size=pool_size).api

    def capacity(self) -> Capacity:
        return self._capacity

    def _containers(self, label: str, value: str) -> List[Mapping[str, Any]]:
        with engine_errors("listing containers"):
            return self.api.containers(all=True, filters={"label": f"{label}={value}"})

    def remove_orphans(self, live_runs: Collection[str]) -> int:
        """Remove the containers that dead runs in this workdir left behind (they crashed),
        then the warm runners' temporary directories of such runs (backends/warm.py)."""
        keep = {self.run_id, *live_runs}
        stale = [
            row["Id"]
            for row in self._containers(LABEL_WORKDIR, self.workdir)
            if row.get("Labels", {}).get(LABEL_RUN) not in keep
        ]
        self.cancel(stale)
        from .warm import remove_stale_dirs

        remove_stale_dirs(self, live_runs=keep)
        return len(stale)

    def _ensure_image(self, image: str) -> None:
        if image in self._images:
            return
        if self.options.pull != "always":
            try:
                with engine_errors("looking up an image"):
                    self.api.inspect_image(image)
                self._images.add(image)
                return
            except docker.errors.ImageNotFound:
                if self.options.pull == "never":
                    raise ImageUnavailable(
                        f"image {image!r} is not on the Docker engine and pulling is off"
                    ) from None
            except docker.errors.APIError as e:
                raise _invalid_image(image, e) from None
        try:
            with engine_errors("pulling an image"):
                try:
                    self.api.pull(image)
                except docker.errors.APIError as e:
                    raise self._pull_failed(image, e) from None
        except docker.errors.DockerException as e:
            raise ImageUnavailable(f"could not pull image {image!r} ({_short(e)})") from None
        self._images.add(image)

    def _pull_failed(self, image: str, error: docker.errors.APIError) -> CrankError:
        """What a refused pull means: a bad reference or an image the registry does not
        have for us fail the job now; anything else (most often a registry that cannot
        be reached) is said at once, once per image, and tried again."""
        if error.status_code == 400 or "invalid reference" in str(error):
            return _invalid_image(image, error)
        failed = f"could not pull image {image!r} ({_short(error)})"
        if not error.is_server_error() or any(a in str(error).lower() for a in _REGISTRY_REFUSALS):
            return ImageUnavailable(failed)
        if image not in self._pull_failures:
            self._pull_failures.add(image)
            self.report(f"{failed}; trying again until --crank-backend-tolerance runs out")
        return BackendUnavailable(failed)

    def submit(self, task: TaskSpec) -> str:
        # a script too long for argv goes as a file: containers of its own (command_for)
        if self.warm is not None and script_fits_argv(task.script):
            handle = self.warm.try_submit(task)
            if handle is not None:
                return handle
        return self.submit_cold(task)

    def host_config_for(self, task: TaskSpec, plan: Sequence[Tuple[str, bool]]) -> Dict[str, Any]:
        """The container's host config: the mounts of ``plan``, limits, network, extras."""
        mounts = [
            docker.types.Mount(target=p, source=p, type="bind", read_only=not rw)
            for p, rw in plan
        ]
        res = task.resources
        host_config: Dict[str, Any] = {
            "mounts": mounts,
            "network_mode": self.options.network,
            "nano_cpus": int(res.cpus * 1e9),
        }
        if res.mem_mb:
            limit = max(res.mem_mb * 1_000_000, DOCKER_MIN_MEMORY)
            # the same value for memory+swap: no swap beyond the limit
            host_config.update(mem_limit=limit, memswap_limit=limit)
        if res.gpus:
            host_config["device_requests"] = [
                gpu_request(res.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
            ]
        host_config.update(self.options.host_config)
        return host_config

    def submit_cold(self, task: TaskSpec) -> str:
        """Start the task as a container of its own."""
        self._ensure_image(task.image)
        plan = plan_mounts(
            task.workdir, [i.path for i in task.inputs], [o.path for o in task.products]
        )
        host_config = self.host_config_for(task, plan)
        name = f"crank-{self.run_id[:8]}-{task.name}"
        try:
            with engine_errors("creating a container"):
                handle = self._create(task, name, host_config)
                self.api.start(handle)
        except (docker.errors.DockerException, TypeError) as e:
            self._remove_quietly(name)
            raise CrankError(self._refusal(task, e)) from None
        except BackendUnavailable:
            # the engine may have made the container before the connection broke
            self._remove_quietly(name)
            raise
        return handle

    def _refusal(self, task: TaskSpec, error: Exception) -> str:
        """Docker's refusal of a container, explained when the cause is known."""
        text = _short(error)
        if task.resources.gpus and "device driver" in text:
            return (
                f"{task.label} asks for gpu={task.resources.gpus} but the Docker engine has no "
                f"NVIDIA runtime ({text}); install the NVIDIA Container Toolkit on the engine's "
                "host, or run the rule without the gpu resource"
            )
        network = self.options.network
        if "network" in text and network in text and "not found" in text:
            return _missing_network(network)
        return f"Docker refused the container for {task.label}: {text}"

    def check_host_config(self) -> None:
        """Raise CrankError when the extra host-config options are not ones the Docker SDK
        takes (checked at start, not per job)."""
        try:
            self.api.create_host_config(**self.options.host_config)
        except (TypeError, ValueError, docker.errors.DockerException) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CrankError(
                f"--crank-docker-host-config is refused: {text}; use Docker SDK host-config "
                "arguments (e.g. shm_size, cap_add, ulimits)"
            ) from None

    def check_network(self) -> None:
        """Raise CrankError when the chosen network does not exist on the engine."""
        network = self.options.network
        if network in ("bridge", "none", "host", "default") or network.startswith("container:"):
            return
        with engine_errors("listing networks"):
            networks = self.api.networks()
        if network not in {n.get(k) for n in networks for k in ("Name", "Id")}:
            raise CrankError(_missing_network(network))

    def command_for(self, task: TaskSpec) -> Tuple[str, ...]:
        """The container's argv: the script as one argument, or, when it is too long for
        one, as a file under the workdir, which the workdir mount makes visible."""
        if script_fits_argv(task.script):
            return task.argv
        directory = os.path.join(task.workdir, ".snakemake", "crank", "scripts", self.run_id)
        path = os.path.join(directory, task.name + ".sh")
        try:
            # in the workdir, where jobs write: never through a symlink one put there
            dir_fd = logs.open_dir(directory, task.workdir)
            try:
                with os.fdopen(logs.create_file(dir_fd, task.name + ".sh"), "w") as f:
                    f.write(task.script)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise CrankError(f"{task.label}: cannot write its script to {path!r} ({logs.why(e)})") from None
        self._script_dirs.add(directory)
        return file_argv(path)

    def _create(self, task: TaskSpec, name: str, host_config: Dict[str, Any]) -> str:
        config = dict(
            image=task.image,
            command=list(self.command_for(task)),
            working_dir=task.workdir,
            user=f"{os.getuid()}:{os.getgid()}",
            environment=dict(task.env),
            labels={LABEL_RUN: self.run_id, LABEL_JOB: task.job_id, LABEL_WORKDIR: self.workdir},
            name=name,
            host_config=self.api.create_host_config(**host_config),
        )
        try:
            return self.api.create_container(**config)["Id"]
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
        # 409: a container of this name is left from a submission whose answer was lost
        self.api.remove_container(name, force=True)
        return self.api.create_container(**config)["Id"]

    def _remove_quietly(self, name: str) -> None:
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            self.cancel([name])

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        warm = [h for h in handles if _is_warm(h)]
        if warm:  # answered from memory; the rest with the one list request
            rest = [h for h in handles if not _is_warm(h)]
            return {**self.warm.poll(warm), **(self.poll(rest) if rest else {})}
        rows = self._containers(LABEL_RUN, self.run_id)
        seen = {row["Id"]: _STATES.get(row["State"], State.RUNNING) for row in rows}
        return {h: seen.get(h, State.LOST) for h in handles}

    def stop(self, handle: str) -> None:
        if _is_warm(handle):
            return self.warm.stop(handle)
        try:
            with engine_errors("stopping a container"):
                self.api.kill(handle)
        except docker.errors.APIError:
            pass  # already ended

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        if _is_warm(handle):
            return self.warm.result(handle, task)
        try:
            with engine_errors("inspecting a container"):
                inspected = self.api.inspect_container(handle)
        except docker.errors.NotFound:
            return TaskResult(ok=False, reason="the container was removed outside crank")
        state = inspected["State"]
        with engine_errors("reading a container's logs"):
            stdout = self.api.logs(handle, stdout=True, stderr=False, stream=True)
            stderr = self.api.logs(handle, stdout=False, stderr=True, stream=True)
            files, tail = logs.save_logs(task, stdout, stderr)
        limit = (inspected.get("HostConfig") or {}).get("Memory")
        ok, reason = judge(state, task, limit)
        return TaskResult(
            ok=ok,
            exit_code=state.get("ExitCode"),
            reason=reason,
            stderr_tail=tail,
            log_files=files,
            seconds=running_seconds(state),
        )

    def release(self, handles: Sequence[str]) -> None:
        if any(_is_warm(h) for h in handles):
            self.warm.release([h for h in handles if _is_warm(h)])
        self.cancel([h for h in handles if not _is_warm(h)])

    def cancel(self, handles: Sequence[str]) -> None:
        if any(_is_warm(h) for h in handles):
            self.warm.cancel([h for h in handles if _is_warm(h)])
            handles = [h for h in handles if not _is_warm(h)]
        for handle in handles:
            try:
                with engine_errors("removing a container"):
                    self.api.remove_container(handle, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:  # 409: removal already in progress
                    raise CrankError(f"Docker refused to remove container {handle[:12]}: {_short(e)}") from None

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()
        try:
            self.cancel([row["Id"] for row in self._containers(LABEL_RUN, self.run_id)])
        finally:
            self.client.close()
            for directory in self._script_dirs:
                shutil.rmtree(directory, ignore_errors=True)


def _missing_network(network: str) -> str:
    return (
        f"--crank-docker-network {network!r} does not exist on the Docker engine; "
        f"create it (docker network create {network}) or use bridge or none"
    )


def _invalid_image(image: str, error: Exception) -> ImageUnavailable:
    e = ImageUnavailable(f"image reference {image!r} is invalid ({_short(error)})")
    e.invalid_reference = True  # the fix is the reference, not loading an image
    return e


def _short(error: Exception) -> str:
    explanation = getattr(error, "explanation", None)
    text = str(explanation or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
