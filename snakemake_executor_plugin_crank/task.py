"""Backend-neutral description of one container task and of its outcome.

Plain values: no Snakemake, no Docker, no I/O. A task is built once by ``jobs.py`` and
handed to a backend unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from .errors import CrankError  # noqa: F401  (moving to errors.py)


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    mem_mb: Optional[int] = None
    disk_mb: Optional[int] = None
    runtime_s: Optional[int] = None
    gpus: int = 0
    preemptible: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """One container run. Every path is absolute and the same inside and outside."""

    name: str  # unique in a run; safe as a file name
    label: str  # what messages name: "rule x" or "group y"
    job_id: str
    attempt: int
    image: str
    script: str
    workdir: str
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    resources: Resources = Resources()
    log_dir: str = ""
    # written by crank from the task's running time (a command run directly has no
    # Snakemake around it to measure it)
    benchmark: Optional[str] = None

    @property
    def argv(self) -> Tuple[str, ...]:
        return shell_argv(self.script)


# bash in strict mode when the image has it, else a POSIX sh (e.g. busybox), with
# pipefail where that sh knows it (dash does not); the script travels as $1, unquoted.
LAUNCHER = (
    'if command -v bash >/dev/null 2>&1; then exec bash -euo pipefail -c "$1"; fi; '
    "set -eu; "
    "if (set -o pipefail) 2>/dev/null; then set -o pipefail; fi; "
    'eval "$1"'
)


def shell_argv(script: str) -> Tuple[str, ...]:
    return ("/bin/sh", "-c", LAUNCHER, "crank", script)


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    # gone from the backend without a terminal state (removed by someone else)
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.LOST)


@dataclass(frozen=True)
class TaskResult:
    ok: bool
    exit_code: Optional[int] = None
    reason: Optional[str] = None
    stderr_tail: str = ""
    log_files: Tuple[str, ...] = ()
    seconds: Optional[float] = None  # running time, when the backend knows it
