"""crank's settings (the --crank-* options), their checks, and the backend they choose."""


import json
from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from .errors import BackendUnavailable, CrankError


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    backend: str = field(
        default="docker",
        metadata={
            "help": "Where tasks run: 'docker' (a Docker engine) or 'tes' (a GA4GH TES "
            "server; not available yet).",
            "env_var": True,
            "choices": ["docker", "tes"],
        },
    )
    default_image: Optional[str] = field(
        default=None,
        metadata={
            "help": "Image for shell: rules that have no container: directive. "
            "Default: Snakemake's --container-image.",
            "env_var": True,
        },
    )
    clamp_resources: bool = field(
        default=False,
        metadata={
            "help": "Lower threads or mem_mb requests that exceed the engine's CPUs or "
            "memory to what it has, with a warning, instead of failing the job.",
            "env_var": True,
        },
    )
    docker_url: Optional[str] = field(
        default=None,
        metadata={
            "help": "Docker engine to use, e.g. unix:///var/run/docker.sock or "
            "tcp://host:2375 (plain HTTP; for TLS set DOCKER_HOST, DOCKER_TLS_VERIFY and "
            "DOCKER_CERT_PATH instead). Default: DOCKER_HOST, then the local socket. The "
            "engine must see the workflow at the same paths.",
            "env_var": True,
        },
    )
    docker_network: str = field(
        default="bridge",
        metadata={
            "help": "Network mode of the containers: 'bridge' (Docker's default), "
            "'none' (no network), 'host', or the name of a Docker network.",
            "env_var": True,
        },
    )
    docker_pull: str = field(
        default="missing",
        metadata={
            "help": "When to pull an image: 'missing' (only when the engine lacks it), "
            "'always', or 'never'.",
            "env_var": True,
            "choices": ["missing", "always", "never"],
        },
    )
    docker_host_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "Extra container options as a JSON object of Docker SDK host-config "
            'arguments, e.g. \'{"shm_size": "1g", "cap_add": ["SYS_PTRACE"]}\'. '
            "They override crank's own (mounts, limits, network).",
            "env_var": True,
        },
    )


def docker_host_config(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CrankError(f"--crank-docker-host-config is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CrankError("--crank-docker-host-config must be a JSON object")
    return value


def backend_from(settings: ExecutorSettings, run_id: str, workdir: str):
    """The backend the settings choose, checked to answer."""
    if settings.backend == "tes":
        raise CrankError(
            "--crank-backend tes is not available in this version of crank; "
            "use --crank-backend docker"
        )
    from .backends.docker import DockerBackend, DockerOptions

    options = DockerOptions(
        base_url=settings.docker_url,
        network=settings.docker_network,
        pull=settings.docker_pull,
        host_config=docker_host_config(settings.docker_host_config),
    )
    try:
        return DockerBackend(run_id, workdir, options)
    except BackendUnavailable as e:
        raise CrankError(
            f"{e}; start dockerd or point --crank-docker-url / DOCKER_HOST at a running engine"
        ) from None


def image_hint(settings: ExecutorSettings) -> str:
    """What to do about an image the backend cannot have, given the settings."""
    if settings.backend == "docker" and settings.docker_pull == "never":
        return "load or build it on the Docker engine first (--crank-docker-pull never)"
    return "load or build it on the Docker engine"
