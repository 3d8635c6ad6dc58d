"""The Docker engine as every part of the backend uses it: the client and its start-up
check, engine errors turned into crank's (one policy, ``engine_errors``; removing a
container, ``remove_container``), labels, files in a container through the archive API,
the host config of a task and what an exit means. The image is images.py's."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors
import docker.types
import requests

from ... import runs
from ...errors import BackendUnavailable, CrankError
from ...task import Capacity, TaskSpec
from ..stamps import nanoseconds, seconds_between

LABEL_RUN = "crank.run"
LABEL_JOB = "crank.job"
LABEL_WORKDIR = "crank.workdir"
LABEL_ORIGIN = "crank.origin"  # runs.origin: tells apart two workdirs at the same path
# a task's container: what it does (adoption.key_of) and which files it writes
LABEL_KEY = "crank.key"
LABEL_PRODUCTS = "crank.products"
# "copy": the container's files were copied in, and its products are copied out (copying.py)
LABEL_FILES = "crank.files"
# a container made only to look at what the engine sees of this machine (sharing.py)
LABEL_PROBE = "crank.probe"

# Docker refuses memory limits below 6 MB.
DOCKER_MIN_MEMORY = 6 * 1024 * 1024
# the start-up check: an engine that accepts connections but never answers is reported
# quickly; later requests keep the SDK's longer timeout (pulls, large logs)
STARTUP_TIMEOUT_S = 10
# what is read from the engine at once when files are copied out of a container
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Hints:
    """How the user sets what a message asks them to check."""

    url: str = "the Docker engine address"
    host_config: str = "the extra host config"
    network: str = "the network"
    tolerance: str = "the backend tolerance"
    files: str = "the way files reach the engine"


@dataclass(frozen=True)
class DockerOptions:
    base_url: Optional[str] = None
    network: str = "bridge"
    pull: str = "missing"
    host_config: Mapping[str, Any] = field(default_factory=dict)
    # run tasks by exec in warm containers where that is safe (warm.py)
    warm: bool = False
    # bind the client's paths, copy the files, or bind where the engine proves it sees them
    files: str = "auto"
    hints: Hints = Hints()


# ---- the client ---------------------------------------------------------------------


def where(options: DockerOptions) -> str:
    """The engine the options name, as the user knows it."""
    return options.base_url or os.environ.get("DOCKER_HOST") or "the default socket"


def client(options: DockerOptions, **kwargs) -> docker.DockerClient:
    """A client of the engine the options name (else DOCKER_HOST, else the socket)."""
    if options.base_url:
        return docker.DockerClient(base_url=options.base_url, **kwargs)
    return docker.from_env(**kwargs)


def connect(options: DockerOptions) -> Tuple[docker.DockerClient, Capacity]:
    """A client of the engine, checked to answer, and the most one task may ask of it."""
    at = where(options)
    silent = (
        f"the Docker engine at {at} accepted the connection but did not answer "
        f"within {STARTUP_TIMEOUT_S} s; check that this address is a Docker engine "
        "and that it is not stuck (restart it)"
    )
    try:
        # a short timeout for the first requests (the SDK asks the version at once)
        made = client(options, timeout=STARTUP_TIMEOUT_S)
        timeout = docker.constants.DEFAULT_TIMEOUT_SECONDS
        try:
            made.api.ping()  # cheap: a busy engine still answers it at once
        except requests.Timeout:
            raise CrankError(silent) from None
        finally:
            made.api.timeout = timeout
        info = made.api.info()
    except docker.errors.DockerException as e:
        if "timed out" in str(e):
            raise CrankError(silent) from None
        if "Invalid bind address" in str(e) or "scheme" in str(e).lower():
            raise CrankError(
                f"{options.hints.url} {at!r} is not a Docker engine "
                "address; use unix:///path/to/docker.sock or tcp://host:port"
            ) from None
        raise BackendUnavailable(f"cannot reach the Docker engine at {at} ({short(e)})") from None
    except requests.RequestException as e:
        raise BackendUnavailable(f"cannot reach the Docker engine at {at} ({short(e)})") from None
    capacity = Capacity(cpus=info.get("NCPU"), mem_mb=int(info.get("MemTotal", 0) / 1e6) or None)
    return made, capacity


_EXIT_STATUS = re.compile(r"^Exited \((\d+)\)")


def ended_by_signal(row: Mapping[str, Any]) -> bool:
    """Whether a container listing's row says a signal ended it (an exit code above 128, as
    a shell reports a signal), or may: an ended container whose code the row does not show
    (dead, being removed), which an engine's stop can leave too."""
    if row.get("State") not in ("exited", "dead", "removing"):
        return False
    found = _EXIT_STATUS.match(row.get("Status") or "")
    return found is None or int(found.group(1)) > 128


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
            raise BackendUnavailable(f"the Docker engine failed while {doing} ({short(e)})") from None
        raise
    except requests.RequestException as e:
        raise BackendUnavailable(f"the Docker engine did not answer while {doing} ({short(e)})") from None


def short(error: Exception) -> str:
    """The first line of what the engine (or the SDK) said."""
    explanation = getattr(error, "explanation", None)
    text = str(explanation or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def labels(run_id: str, job_id: str, workdir: str) -> Dict[str, str]:
    """The labels every container of a run carries (orphan removal lists by them)."""
    return {LABEL_RUN: run_id, LABEL_JOB: job_id, LABEL_WORKDIR: workdir, LABEL_ORIGIN: runs.origin(workdir)}


def foreign(row: Mapping[str, Any], workdir: str) -> bool:
    """A container of another directory at the workdir's path (another machine or user on a
    shared engine, see runs.origin); one made by an older crank carries no origin: ours."""
    theirs = (row.get("Labels") or {}).get(LABEL_ORIGIN)
    return theirs is not None and theirs != runs.origin(workdir)


def containers(api, label: str, value: str) -> List[Mapping[str, Any]]:
    """The containers, running or not, whose ``label`` is ``value``."""
    with engine_errors("listing containers"):
        return api.containers(all=True, filters={"label": f"{label}={value}"})


def create_container(api, config: Mapping[str, Any]) -> str:
    """Create the container ``config`` names; one of that name left by a creation whose
    answer was lost (409) is removed first. Its id."""
    try:
        return api.create_container(**config)["Id"]
    except docker.errors.APIError as e:
        if e.status_code != 409:
            raise
    remove_container(api, config["name"])
    return api.create_container(**config)["Id"]


def exit_code_of(api, cid: str, argv: Sequence[str], user: str) -> Optional[int]:
    """Run ``argv`` in the running container as ``user`` and wait for it: its exit code."""
    exec_id = api.exec_create(cid, list(argv), user=user)["Id"]
    api.exec_start(exec_id)
    return api.exec_inspect(exec_id).get("ExitCode")


def remove_container(api, cid: str) -> None:
    """Remove a container, running or not; one already gone, or being removed (409), is
    fine. An engine that does not answer raises BackendUnavailable."""
    try:
        with engine_errors("removing a container"):
            api.remove_container(cid, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if e.status_code != 409:
            raise CrankError(f"Docker refused to remove container {cid[:12]}: {short(e)}") from None


# ---- files in a container (the archive API) -------------------------------------------

# where a warm runner's task writes its stdout, stderr, exit code and usage (runners.py)
LOGS = "/.crank-logs"

# Go's os.FileMode type bits, as a path stat gives them
GO_DIR = 1 << 31
GO_LINK = 1 << 27


def path_stat(api, cid: str, path: str) -> Optional[Dict[str, Any]]:
    """What the container has at ``path`` (name, size, mode as Go's file mode, mtime,
    linkTarget), or None: asked without its content (HEAD)."""
    with engine_errors("looking at a path in a container"):
        answer = api.head(api._url("/containers/{0}/archive", cid), params={"path": path})
    if answer.status_code == 404:
        return None
    if answer.status_code >= 400:
        with engine_errors("looking at a path in a container"):
            api._raise_for_status(answer)
    encoded = answer.headers.get("X-Docker-Container-Path-Stat")
    return docker.utils.decode_json_header(encoded) if encoded else None


def stat_mtime_ns(path_stat: Mapping[str, Any]) -> Optional[int]:
    """A path stat's modification time in nanoseconds (the engine gives them all)."""
    try:
        return nanoseconds(str(path_stat.get("mtime")))
    except (TypeError, ValueError, AttributeError):
        return None


def put_files(api, cid: str, tar_stream) -> None:
    """Unpack the tar ``tar_stream`` (bytes, or an iterator of them) at ``/`` in the
    container, which need not be running."""
    with engine_errors("copying files into a container"):
        if not api.put_archive(cid, "/", tar_stream):
            raise CrankError(f"Docker did not take the files for container {cid[:12]}")


def get_files(api, cid: str, path: str):
    """A tar stream of ``path`` in the container (an iterator of bytes) and its path
    stat, or None when the container has nothing there."""
    try:
        with engine_errors("copying files out of a container"):
            return api.get_archive(cid, path, chunk_size=COPY_CHUNK)
    except docker.errors.NotFound:
        return None


def check_host_config(api, options: DockerOptions) -> None:
    """Raise CrankError when the extra host-config options are not ones the Docker SDK
    takes (checked at start, not per job)."""
    try:
        api.create_host_config(**options.host_config)
    except (TypeError, ValueError, docker.errors.DockerException) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrankError(
            f"{options.hints.host_config} is refused: {text}; use Docker SDK host-config "
            "arguments (e.g. shm_size, cap_add, ulimits)"
        ) from None


def check_network(api, network: str, hints: Hints) -> None:
    """Raise CrankError when the chosen network does not exist on the engine."""
    if network in ("bridge", "none", "host", "default") or network.startswith("container:"):
        return
    with engine_errors("listing networks"):
        networks = api.networks()
    if network not in {n.get(k) for n in networks for k in ("Name", "Id")}:
        raise CrankError(missing_network(network, hints))


def missing_network(network: str, hints: Hints) -> str:
    return (
        f"{hints.network} {network!r} does not exist on the Docker engine; "
        f"create it (docker network create {network}) or use bridge or none"
    )


# ---- host config ----------------------------------------------------------------------


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


def host_config_for(
    options: DockerOptions, task: TaskSpec, plan: Sequence[Tuple[str, bool]]
) -> Dict[str, Any]:
    """The container's host config: the mounts of ``plan``, limits, network, extras."""
    mounts = [
        docker.types.Mount(target=p, source=p, type="bind", read_only=not rw)
        for p, rw in plan
    ]
    res = task.resources
    host_config: Dict[str, Any] = {
        "mounts": mounts,
        "network_mode": options.network,
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
    host_config.update(options.host_config)
    return host_config


# ---- what an exit means ---------------------------------------------------------------


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
