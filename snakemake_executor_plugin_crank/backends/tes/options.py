"""What the TES backend is opened with (opening.py builds it from crank's settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TesOptions:
    """The server, the storage and the pools; the settings' factory builds the session and
    the Stagers from them."""

    url: str
    storage_prefix: str
    user: Optional[str] = None
    password: Optional[str] = None
    token: Optional[str] = None
    token_command: Optional[str] = None  # prints a token; run again when it runs out
    storage_endpoint: Optional[str] = None
    # an upload that hands over no part for this long is dropped and sent again, until it
    # has stalled for tolerance_s (the backend tolerance)
    storage_stall_s: float = 300.0
    tolerance_s: float = 120.0
    # concurrent stage-and-create jobs (each stages with the stager's own upload pool)
    submit_workers: int = 4
    upload_workers: int = 8
    # downloads of finished tasks' products: a pool and store client of their own, so a
    # status round never waits behind input uploads
    download_workers: int = 8
    # remove a task's objects under runs/ once its outcome is reported
    keep_run_objects: bool = False
