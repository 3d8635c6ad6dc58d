"""crank's settings (the --crank-* options), their checks, and the backend they choose."""


import json
import os
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

from .errors import BackendUnavailable, CrankError


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    backend: str = field(
        default="docker",
        metadata={
            "help": "Where tasks run: 'docker' (a Docker engine) or 'tes' (a GA4GH TES "
            "server: set --crank-tes-url and --crank-storage-prefix).",
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
    """The settings checked together, for every backend, before one is built: a
    CrankError names the first wrong one and what to give instead."""
    if not settings.backend_tolerance >= 0:
        raise CrankError(
            f"--crank-backend-tolerance {settings.backend_tolerance!r} must be a number of "
            "seconds >= 0"
        )
    if settings.backend != "tes":
        return
    if not settings.storage_stall > 0:
        raise CrankError(
            f"--crank-storage-stall {settings.storage_stall!r} must be a number of seconds > 0")
    missing = [
        name for name, value in (
            ("--crank-tes-url", settings.tes_url), ("--crank-storage-prefix", settings.storage_prefix)
        ) if not value
    ]
    if missing:
        raise CrankError(f"--crank-backend tes needs {' and '.join(missing)}")
    given = [name for name, value in (
        ("--crank-tes-token", settings.tes_token),
        ("--crank-tes-token-command", settings.tes_token_command),
        ("--crank-tes-user/--crank-tes-password", settings.tes_user or settings.tes_password),
    ) if value]
    if len(given) > 1:
        raise CrankError(f"give only one of {', '.join(given)}: they are different credentials")
    if settings.tes_token_command is not None and not settings.tes_token_command.strip():
        raise CrankError("--crank-tes-token-command is empty; give a command that prints a token")
    if settings.tes_password and not settings.tes_user:
        raise CrankError("--crank-tes-password needs --crank-tes-user")


def tes_backend(settings: ExecutorSettings, run_id: str, workdir: str, report=None):
    """The TES backend for checked settings (``check``), itself checked before any job:
    server reachable, storage writable. ``report(line)`` gets staging progress and the
    run's staging summary."""
    from .backends.tes.backend import TesOptions

    options = TesOptions(
        url=settings.tes_url,
        storage_prefix=settings.storage_prefix,
        user=settings.tes_user,
        password=settings.tes_password,
        token=settings.tes_token,
        token_command=settings.tes_token_command,
        storage_endpoint=settings.storage_endpoint,
        storage_stall_s=settings.storage_stall,
        tolerance_s=settings.backend_tolerance,
    )
    return open_tes_backend(run_id, workdir, options, report=report)


TOKEN_COMMAND = "--crank-tes-token-command / SNAKEMAKE_CRANK_TES_TOKEN_COMMAND"


def tes_hints(options):
    """How the user sets the TES URL and the credentials, for the HTTP session's messages."""
    from .backends.tes.http import Hints

    if options.token_command:
        credentials = (
            f"the token {TOKEN_COMMAND} printed (the command ran again after the first 401)"
        )
    elif options.token:
        credentials = "--crank-tes-token / SNAKEMAKE_CRANK_TES_TOKEN"
    elif options.user or urlsplit(options.url).username:
        credentials = (
            "--crank-tes-user and --crank-tes-password / SNAKEMAKE_CRANK_TES_USER and "
            "SNAKEMAKE_CRANK_TES_PASSWORD"
        )
    else:
        credentials = "--crank-tes-token or --crank-tes-user/--crank-tes-password (none given)"
    return Hints(url="--crank-tes-url", credentials=credentials)


def open_tes_backend(run_id: str, workdir: str, options, session=None, report=None):
    """The TES backend for ``options`` with its HTTP session (``session``, else one of its
    own) and its Stagers, checked before any job: server answering, storage writable."""
    from .backends.tes.api import TesApi
    from .backends.tes.backend import TesBackend
    from .backends.tes.http import Session, Throttled
    from .backends.tes.token import TokenCommand, first_token
    from .staging.digest import DigestCache
    from .staging.stage import Stager
    from .staging.store import Store

    report = report or (lambda line: None)
    tokens = None
    if options.token_command and session is None:
        tokens = TokenCommand(options.token_command, option=TOKEN_COMMAND, report=report)
        first_token(tokens)  # a command that gives no token stops the run before anything
    http = session or Session(
        options.url, options.user, options.password, options.token, hints=tes_hints(options),
        tokens=tokens,
    )
    api = TesApi(http, report)
    try:
        try:
            api.service_info()
        except Throttled as e:
            raise CrankError(f"{e}; try again later") from None
        except BackendUnavailable as e:
            raise CrankError(f"{e}; check --crank-tes-url") from None
        store = Store.from_url(options.storage_prefix, options.storage_endpoint)
        store.check()
    except BackendUnavailable as e:
        http.close()
        raise CrankError(str(e)) from None
    except BaseException:
        http.close()
        raise
    state_dir = os.path.join(os.path.abspath(workdir), ".snakemake", "crank")
    os.makedirs(state_dir, exist_ok=True)
    cache = DigestCache(os.path.join(state_dir, "digests.sqlite"))
    store.stall_s, store.tolerance_s = options.storage_stall_s, options.tolerance_s
    stager = Stager(store, cache, workers=options.upload_workers, progress=report)
    # downloads get a store client and pool of their own: a status round never waits behind uploads
    fetcher = Stager(
        Store.from_url(options.storage_prefix, options.storage_endpoint), cache,
        workers=options.download_workers,
    )
    return TesBackend(run_id, workdir, options, api, stager, fetcher, report)


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


def backend_from(settings: ExecutorSettings, run_id: str, workdir: str, report=None):
    """The backend the settings choose, checked to answer; ``report(line)`` gets what a
    backend has to tell the user (staging progress)."""
    check(settings)
    if settings.backend == "tes":
        return tes_backend(settings, run_id, workdir, report)
    from .backends.docker import DockerBackend, DockerOptions, Hints

    options = DockerOptions(
        base_url=settings.docker_url,
        network=settings.docker_network,
        pull=settings.docker_pull,
        host_config=docker_host_config(settings.docker_host_config),
        warm=settings.docker_warm == "yes",
        hints=Hints(
            url="--crank-docker-url / DOCKER_HOST",
            host_config="--crank-docker-host-config",
            network="--crank-docker-network",
            tolerance="--crank-backend-tolerance",
        ),
    )
    try:
        backend = DockerBackend(run_id, workdir, options, report)
        # options the engine would refuse are found now, not job by job
        backend.check_host_config()
        backend.check_network()
        return backend
    except BackendUnavailable as e:
        raise CrankError(
            f"{e}; start dockerd or point --crank-docker-url / DOCKER_HOST at a running engine"
        ) from None


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
    if settings.backend == "tes":
        return "push it to a registry the TES server's workers can pull from"
    if settings.docker_pull == "never":
        return "load or build it on the Docker engine first (--crank-docker-pull never)"
    return "load or build it on the Docker engine"
