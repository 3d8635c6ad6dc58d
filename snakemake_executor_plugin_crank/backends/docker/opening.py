"""How the Docker backend is opened from crank's settings (backends/registry.py)."""

from __future__ import annotations

import json
from typing import Optional

from ...errors import BackendUnavailable, CrankError
from .backend import DockerBackend
from .engine import DockerOptions, Hints

UNIT = "container"
SERVER_STORES_URLS = False


def check(settings) -> None:
    docker_host_config(settings.docker_host_config)


def open_backend(settings, run_id: str, workdir: str, report=None) -> DockerBackend:
    """The backend for checked settings, the engine found to answer and to take the
    host config and network the settings give (not found job by job)."""
    options = DockerOptions(
        base_url=settings.docker_url,
        network=settings.docker_network,
        pull=settings.docker_pull,
        host_config=docker_host_config(settings.docker_host_config),
        warm=settings.docker_warm == "yes",
        files=settings.docker_files,
        hints=Hints(
            url="--crank-docker-url / DOCKER_HOST",
            host_config="--crank-docker-host-config",
            network="--crank-docker-network",
            tolerance="--crank-backend-tolerance",
            files="--crank-docker-files",
        ),
    )
    try:
        backend = DockerBackend(run_id, workdir, options, report)
        backend.check_host_config()
        backend.check_network()
        backend.check_files()
        return backend
    except BackendUnavailable as e:
        raise CrankError(
            f"{e}; start dockerd or point --crank-docker-url / DOCKER_HOST at a running engine"
        ) from None


def image_hint(settings) -> str:
    if settings.docker_pull == "never":
        return "load or build it on the Docker engine first (--crank-docker-pull never)"
    return "load or build it on the Docker engine"


def docker_host_config(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CrankError(
            f"--crank-docker-host-config is not valid JSON ({e}); give a JSON object, "
            'e.g. \'{"shm_size": "1g"}\''
        ) from None
    if not isinstance(value, dict):
        raise CrankError(
            "--crank-docker-host-config must be a JSON object, e.g. '{\"shm_size\": \"1g\"}'"
        )
    return value
