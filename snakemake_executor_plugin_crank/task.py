"""Backend-neutral description of one container task and of its outcome.

Plain values: no Snakemake, no Docker, no I/O. A task is built once by the adapter and
handed to a backend unchanged. This module imports nothing of crank's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple


class Kind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"


class Launch(enum.Enum):
    """How a task runs its job, decided once when the job's tasks are built."""

    # the rule's shell command run directly in its image: crank does around it what
    # Snakemake would (benchmark file from the running time, touch(), update() copies)
    DIRECT = "direct"
    # Snakemake's own job command, in an image that has Snakemake: it does all that itself
    SNAKEMAKE = "snakemake"


@dataclass(frozen=True)
class Input:
    """A file or directory the task reads, at the same absolute path inside and outside.
    ``url`` is set when it already lives in object storage."""

    path: str
    kind: Kind = Kind.FILE
    url: Optional[str] = None


@dataclass(frozen=True)
class Output:
    """A file or directory the task writes, at the same absolute path inside and outside.
    ``read_later``: another task of the run reads it (a backend that stages may keep it
    where that task can fetch it). ``update``: an ``update()`` output, which the task
    changes in place (its old content must be there, writable, when the task starts).
    ``url``: a file in object storage that a backend able to write there stores itself
    (only when the task succeeded); the host then never gets a local copy."""

    path: str
    kind: Kind = Kind.FILE
    read_later: bool = False
    update: bool = False
    url: Optional[str] = None


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    mem_mb: Optional[int] = None
    disk_mb: Optional[int] = None
    runtime_s: Optional[int] = None
    gpus: int = 0
    preemptible: bool = False
    gpu_model: Optional[str] = None  # e.g. a100; TES backend_parameters, not used by Docker


@dataclass(frozen=True)
class Capacity:
    """What one task may get at most on a backend; None means no known limit."""

    cpus: Optional[int] = None
    mem_mb: Optional[int] = None
    gpus: Optional[int] = None


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
    inputs: Tuple[Input, ...] = ()
    outputs: Tuple[Output, ...] = ()
    logs: Tuple[Output, ...] = ()
    # benchmark files: crank writes them from the task's running time when it runs
    # directly (nothing around the command measures it), else Snakemake in the task does
    benchmarks: Tuple[str, ...] = ()
    launch: Launch = Launch.SNAKEMAKE
    resources: Resources = Resources()
    log_dir: str = ""  # where crank keeps the task's stdout and stderr
    # the workflow's source files (Snakefiles, scripts, config, a git checkout's tracked
    # files), which a command may read by path without declaring them: the same for every
    # task of a run; a backend that does not share the host's files provides them
    sources: Tuple[str, ...] = ()

    @property
    def argv(self) -> Tuple[str, ...]:
        return shell_argv(self.script)

    @property
    def products(self) -> Tuple[Output, ...]:
        """Everything the task writes: outputs, logs and benchmark files."""
        return self.outputs + self.logs + tuple(Output(b) for b in self.benchmarks)


def _launcher(with_bash: str, with_sh: str) -> str:
    """bash in strict mode when the image has it, else a POSIX sh (e.g. busybox), with
    pipefail where that sh knows it (dash does not)."""
    return (
        f"if command -v bash >/dev/null 2>&1; then exec bash -euo pipefail {with_bash}; fi; "
        "set -eu; "
        "if (set -o pipefail) 2>/dev/null; then set -o pipefail; fi; "
        f"{with_sh}"
    )


# the script travels as $1, unquoted
LAUNCHER = _launcher('-c "$1"', 'eval "$1"')


def shell_argv(script: str) -> Tuple[str, ...]:
    return ("/bin/sh", "-c", LAUNCHER, "crank", script)


# The same for a script delivered as a file ($1 is its path inside the container): a
# script longer than the kernel's limit for one argument (MAX_ARG_STRLEN, 128 KiB) cannot
# travel in argv. Backends send scripts longer than SCRIPT_ARG_LIMIT bytes as a file.
SCRIPT_ARG_LIMIT = 64 * 1024
FILE_LAUNCHER = _launcher('"$1"', '. "$1"')


def file_argv(path: str) -> Tuple[str, ...]:
    return ("/bin/sh", "-c", FILE_LAUNCHER, "crank", path)


def script_fits_argv(script: str) -> bool:
    return len(script.encode()) <= SCRIPT_ARG_LIMIT


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    # the backend took the task back (a preemptible machine was reclaimed)
    PREEMPTED = "preempted"
    CANCELED = "canceled"
    # gone from the backend without a terminal state (removed by someone else)
    LOST = "lost"
    # ended through no fault of its own (the Docker engine stopped or restarted under it):
    # run again once
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self not in (State.QUEUED, State.RUNNING)


@dataclass(frozen=True)
class Adopted:
    """A dead run's task taken over by this run: its handle, and how long it had been
    running when taken (None when it had not started, or the backend cannot tell), so that
    its wall time counts from its start, not from the adoption."""

    handle: str
    ran_s: Optional[float] = None


@dataclass(frozen=True)
class Usage:
    """What a task used, as measured where it ran; None where the platform does not tell.
    MB are decimal (10^6 bytes), as ``mem_mb``."""

    queue_s: Optional[float] = None  # from its submission to the start of its command
    cpu_s: Optional[float] = None  # user + system
    peak_mb: Optional[float] = None  # the most memory its container held (page cache too)
    read_mb: Optional[float] = None
    written_mb: Optional[float] = None
    staged_in_mb: Optional[float] = None  # its local inputs, sent or found in the store
    staged_out_mb: Optional[float] = None  # what came back from the store for it


@dataclass(frozen=True)
class TaskResult:
    ok: bool
    exit_code: Optional[int] = None
    reason: Optional[str] = None
    stderr_tail: str = ""
    log_files: Tuple[str, ...] = ()
    seconds: Optional[float] = None  # running time, when the backend knows it
    usage: Usage = Usage()
    out_of_memory: bool = False  # it failed because it reached its memory limit
