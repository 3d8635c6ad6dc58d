"""crank's settings (the --crank-* options), their checks, and the backend they choose."""


from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from .backends import registry
from .errors import CrankError


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    backend: str = field(
        default="docker",
        metadata={
            "help": "Where tasks run: 'docker' (a Docker engine) or 'tes' (a GA4GH TES "
            "server: set --crank-tes-url and --crank-storage-prefix).",
            "env_var": True,
            "choices": list(registry.BACKENDS),
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
            "help": "Lower mem_mb requests that exceed the engine's memory to what it has, "
            "with a warning, instead of failing the job. (Threads above the engine's CPUs "
            "are always lowered, as Snakemake caps threads at --cores.)",
            "env_var": True,
        },
    )
    envmodules: str = field(
        default="ignore",
        metadata={
            "help": "Rules with envmodules: and no container: image: 'ignore' (run them in "
            "the default image; say so once per run) or 'fail' (fail their jobs). A "
            "container has no environment modules.",
            "env_var": True,
            "choices": ["ignore", "fail"],
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
    detach: bool = field(
        default=False,
        metadata={
            "help": "On Ctrl-C, leave the running tasks on the backend instead of canceling "
            "them; a later crank run in this directory (with --rerun-incomplete) adopts "
            "those that do the work its jobs ask for and cancels the rest. (On SIGTERM "
            "Snakemake waits for its running jobs.)",
            "env_var": True,
        },
    )
    backend_tolerance: float = field(
        default=120.0,
        metadata={
            "help": "Seconds the backend may stay unreachable or failing (engine restart, "
            "network blip) before the running jobs are reported failed; meanwhile crank "
            "retries with backoff.",
            "env_var": True,
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
    docker_warm: str = field(
        default="yes",
        metadata={
            "help": "Run jobs by exec in warm containers kept per image, mounts and limits "
            "(each job still gets a private /tmp, its limits and OOM and wall-time "
            "reports), which is several times faster than a container per job. "
            "'no': one new container per job.",
            "env_var": True,
            "choices": ["yes", "no"],
        },
    )
    docker_files: str = field(
        default="auto",
        metadata={
            "help": "How a job's files reach the Docker engine: 'bind' mounts the client's "
            "paths (the engine must see this machine's files: a local engine, or the same "
            "shared file system), 'copy' copies each job's inputs into its container and its "
            "outputs, logs and benchmarks back, 'auto' binds where the engine proves it sees the "
            "workdir and the inputs (a file crank writes there) and copies otherwise.",
            "env_var": True,
            "choices": ["auto", "bind", "copy"],
        },
    )

    tes_url: Optional[str] = field(
        default=None,
        metadata={
            "help": "Base URL of the GA4GH TES server (the part before /v1/tasks), e.g. "
            "http://127.0.0.1:8000. Required with --crank-backend tes.",
            "env_var": True,
        },
    )
    tes_user: Optional[str] = field(
        default=None,
        metadata={"help": "User name for HTTP basic auth at the TES server.", "env_var": True},
    )
    tes_password: Optional[str] = field(
        default=None,
        metadata={
            "help": "Password for HTTP basic auth at the TES server (prefer the environment "
            "variable: it is never logged nor put in a task).",
            "env_var": True,
        },
    )
    tes_token: Optional[str] = field(
        default=None,
        metadata={
            "help": "Bearer token for the TES server (prefer the environment variable: it is "
            "never logged nor put in a task).",
            "env_var": True,
        },
    )
    tes_token_command: Optional[str] = field(
        default=None,
        metadata={
            "help": "Shell command that prints a bearer token for the TES server on stdout "
            "(e.g. an OIDC client-credentials request piped through jq -r .access_token). "
            "It is run at start, again when the server answers 401, and shortly before the "
            "token's exp when it is a JWT; the tokens are never logged nor put in a task.",
            "env_var": True,
        },
    )
    storage_prefix: Optional[str] = field(
        default=None,
        metadata={
            "help": "Object storage the TES server can read and write, where crank puts inputs "
            "and the tasks put outputs: s3://bucket/path, gs://bucket/path, "
            "az://container/path or file:///shared/dir. Required with --crank-backend tes.",
            "env_var": True,
        },
    )
    storage_endpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "Endpoint of an S3-compatible store (e.g. http://127.0.0.1:9000). "
            "Default: AWS_ENDPOINT_URL. Credentials come from the AWS_* variables.",
            "env_var": True,
        },
    )
    storage_stall: float = field(
        default=300.0,
        metadata={
            "help": "Seconds an input upload may hand the store no part (8 MiB) before it is "
            "dropped and sent again; once it has stalled for --crank-backend-tolerance, its "
            "job fails. Raise it on links slower than about 2 Mbit/s.",
            "env_var": True,
        },
    )


def check(settings: ExecutorSettings) -> None:
    """The settings checked together before a backend is built, those of every backend and
    the chosen backend's own: a CrankError names the first wrong one and what to give
    instead."""
    if not settings.backend_tolerance >= 0:
        raise CrankError(
            f"--crank-backend-tolerance {settings.backend_tolerance!r} must be a number of "
            "seconds >= 0"
        )
    registry.kind(settings.backend).check(settings)


def backend_from(settings: ExecutorSettings, run_id: str, workdir: str, report=None):
    """The backend the settings choose, checked to answer; ``report(line)`` gets what a
    backend has to tell the user (staging progress)."""
    check(settings)
    return registry.kind(settings.backend).open_backend(settings, run_id, workdir, report)


def image_message(error: Exception, source: str, settings: ExecutorSettings,
                  default_image: Optional[str]) -> str:
    """The message of an image the backend cannot have (``error``), with what to do:
    ``source`` says where the image came from (``jobs.image_source``), and
    ``default_image`` is the image crank used for a rule without ``container:``."""
    if source.startswith("--crank-default-image") and not settings.default_image:
        # nobody chose this image: it is Snakemake's --container-image (or its default)
        source = (
            "the image: the rule has no container: and --crank-default-image is unset, "
            f"so crank used --container-image ({default_image}); pass --crank-default-image "
            "or add container: to the rule"
        )
    if getattr(error, "invalid_reference", False):
        return f"{error}; fix {source}"
    return f"{error}; {image_hint(settings)}, or fix {source}"


def image_hint(settings: ExecutorSettings) -> str:
    """What to do about an image the backend cannot have, given the settings."""
    return registry.kind(settings.backend).image_hint(settings)
