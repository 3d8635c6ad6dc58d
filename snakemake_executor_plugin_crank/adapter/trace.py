"""The usage trace of a run: one row per task attempt that ran, appended to
``.snakemake/crank/usage/<run>.tsv`` as each job ends, and copied to ``latest.tsv`` when the
run ends (after a failure or Ctrl-C too). Tab-separated with a header; the columns are
documented in docs/further.md. What was asked comes first, then what was used; a value the
backend does not measure is empty, never guessed. The directory is under the workdir,
where jobs write: it is reached through no link, and the files are never written through
one."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence, Tuple

from ..backends.logs import open_dir
from ..task import TaskResult, TaskSpec
from . import guarded
from .jobs import single_jobs

COLUMNS = (
    "rule", "jobid", "attempt", "wildcards", "status", "exit", "cpus", "memory_mb",
    "runtime_min", "queue_s", "realtime_s", "cpu_s", "peak_rss_mb", "read_mb", "written_mb",
    "staged_in_mb", "staged_out_mb", "backend", "image",
)
USAGE_DIR = (".snakemake", "crank", "usage")
LATEST = "latest.tsv"


class Trace:
    def __init__(self, workdir: str, run_id: str, backend: str):
        self.workdir = workdir
        self.directory = os.path.join(workdir, *USAGE_DIR)
        self.name = f"{run_id}.tsv"
        self.backend = backend
        self.rows = 0
        self.unmeasured = False  # a row without CPU time: the backend does not measure it

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    def add(self, job: Any, ended: Sequence[Tuple[TaskSpec, TaskResult]],
            warn: Callable[[str], None]) -> None:
        """The rows of ``job``'s task attempts that ended."""
        if not ended:
            return
        try:
            self._append(job, ended)
        except OSError as e:
            warn(f"crank: cannot write the usage trace {self.path} ({e.strerror or e})")

    def close(self, info: Callable[[str], None], warn: Callable[[str], None]) -> None:
        """``latest.tsv`` made a copy of this run's trace, and the user told where it is."""
        if not self.rows:
            return
        try:
            self._copy_to_latest()
        except OSError as e:
            warn(f"crank: cannot write the usage trace's {LATEST} ({e.strerror or e})")
        info(f"crank: what each job used: {os.path.relpath(self.path, self.workdir)}")
        if self.unmeasured:
            info(f"crank: the {self.backend} backend does not measure CPU time, memory or I/O "
                 "yet: those columns of the trace are empty")

    def _append(self, job: Any, ended: Sequence[Tuple[TaskSpec, TaskResult]]) -> None:
        singles = {str(s.jobid): s for s in single_jobs(job)}
        lines = [_line(self._row(singles.get(task.job_id, job), task, result)) for task, result in ended]
        fd = open_dir(self.directory, self.workdir)
        try:
            out = os.open(self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o666, dir_fd=fd)
            with os.fdopen(out, "a") as f:
                if f.tell() == 0:
                    f.write(_line(COLUMNS))
                f.writelines(lines)
        finally:
            os.close(fd)
        self.rows += len(lines)

    def _copy_to_latest(self) -> None:
        fd = open_dir(self.directory, self.workdir)
        try:
            source = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(source, "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
        latest = os.path.join(self.directory, LATEST)
        guarded.write(guarded.note(latest), data)

    def _row(self, single: Any, task: TaskSpec, result: TaskResult) -> Iterable[Any]:
        r, used = task.resources, result.usage
        if used.cpu_s is None:
            self.unmeasured = True
        wildcards = ",".join(f"{k}={v}" for k, v in getattr(single, "wildcards", {}).items())
        return (
            getattr(getattr(single, "rule", None), "name", ""), task.job_id, task.attempt, wildcards,
            "ok" if result.ok else "failed", result.exit_code, r.cpus, r.mem_mb,
            None if r.runtime_s is None else r.runtime_s / 60, used.queue_s, result.seconds,
            used.cpu_s, used.peak_mb, used.read_mb, used.written_mb, used.staged_in_mb,
            used.staged_out_mb,
            self.backend, task.image,
        )


def _line(values: Iterable[Any]) -> str:
    return "\t".join(_cell(v) for v in values) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return " ".join(str(value).split())  # no tab or line break inside a cell

