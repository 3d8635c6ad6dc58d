"""How the TES backend is opened from crank's settings (backends/registry.py): its HTTP
session, API, stores and stagers, checked before any job."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from ...errors import BackendUnavailable, CrankError
from ...staging.digest import DigestCache
from ...staging.stage import Stager
from ...staging.store import Store
from .api import TesApi
from .backend import TesBackend
from .http import Hints, Session, Throttled
from .options import TesOptions
from .token import TokenCommand, first_token

UNIT = "task"
SERVER_STORES_URLS = True


def check(settings) -> None:
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


def open_backend(settings, run_id: str, workdir: str, report=None) -> TesBackend:
    """The TES backend for checked settings (``check``), itself checked before any job:
    server reachable, storage writable. ``report(line)`` gets staging progress and the
    run's staging summary."""
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


def image_hint(settings) -> str:
    return "push it to a registry the TES server's workers can pull from"
