"""The usage trace of a run: one row per task attempt that ran, appended to
``.snakemake/crank/usage/<run>.tsv`` as each job ends; when the run ends (after a failure
or Ctrl-C too), a copy as ``latest.tsv``, the report (``<run>.html`` and ``latest.html``),
the right-sizing hints, said and written to ``suggested-resources.yaml``. Tab-separated
with a header; the columns are documented in docs/further.md. What was asked comes first,
then what was used; a value the backend does not measure is empty, never guessed. The
directory is under the workdir, where jobs write: it is reached through no link, and the
files are never written through one."""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .. import report, sizing
from ..backends.logs import open_dir
from . import guarded
from .jobs import single_jobs

COLUMNS = (
    "rule", "jobid", "attempt", "wildcards", "status", "exit", "cpus", "memory_mb",
    "runtime_min", "queue_s", "realtime_s", "cpu_s", "peak_rss_mb", "read_mb", "written_mb",
    "staged_in_mb", "staged_out_mb", "backend", "image", "submitted", "ended",
)
USAGE_DIR = (".snakemake", "crank", "usage")
LATEST = "latest.tsv"
LATEST_REPORT = "latest.html"
SUGGESTED = "suggested-resources.yaml"


class Trace:
    def __init__(self, workdir: str, run_id: str, backend: str):
        self.workdir = workdir
        self.directory = os.path.join(workdir, *USAGE_DIR)
        self.run_id = run_id
        self.name = f"{run_id}.tsv"
        self.backend = backend
        self.rows: List[Dict[str, Any]] = []

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    def add(self, job: Any, ended: Sequence[Any], warn: Callable[[str], None]) -> None:
        """The rows of ``job``'s task attempts that ended (runner.Attempt)."""
        if not ended:
            return
        singles = {str(s.jobid): s for s in single_jobs(job)}
        rows = [self._row(singles.get(a.task.job_id, job), a) for a in ended]
        self.rows += rows
        try:
            self._append(rows)
        except OSError as e:
            warn(f"crank: cannot write the usage trace {self.path} ({e.strerror or e})")

    def close(self, info: Callable[[str], None], warn: Callable[[str], None]) -> None:
        """The trace's copy, the report and the hints, and the user told where they are."""
        if not self.rows:
            return
        found = sizing.hints(sizing.summarize(self.rows))
        for hint in found:
            info(hint.line)
        try:
            fd = open_dir(self.directory, self.workdir)
        except OSError as e:
            warn(f"crank: cannot write the usage report under {self.directory} ({e.strerror or e})")
            return
        try:
            self._finish(fd, found, warn)
        finally:
            os.close(fd)
        where = os.path.relpath(self.directory, self.workdir)
        info(f"crank: what each job used: {os.path.join(where, self.name)} "
             f"(report: {os.path.join(where, self.run_id + '.html')})")
        if found:
            info(f"crank: suggested resources for a profile: {os.path.join(where, SUGGESTED)}")
        if all(row["cpu_s"] is None for row in self.rows):
            info(f"crank: the {self.backend} backend did not measure CPU time, memory or I/O "
                 "for these jobs: those columns of the trace are empty")

    def _finish(self, fd: int, found: Sequence[sizing.Hint], warn: Callable[[str], None]) -> None:
        steps = [
            (LATEST, lambda: guarded.alias_at(fd, self.name, LATEST)),
            (self.run_id + ".html", lambda: guarded.replace_at(fd, self.run_id + ".html", report.html_page(
                self.rows, found, self.run_id, self.backend).encode())),
            (LATEST_REPORT, lambda: guarded.alias_at(fd, self.run_id + ".html", LATEST_REPORT)),
        ]
        if found:
            steps.append((SUGGESTED, lambda: guarded.replace_at(fd, SUGGESTED, sizing.profile_snippet(found).encode())))
        for name, step in steps:
            try:
                step()
            except OSError as e:
                warn(f"crank: cannot write {os.path.join(self.directory, name)} ({e.strerror or e})")

    def _append(self, rows: Sequence[Dict[str, Any]]) -> None:
        fd = open_dir(self.directory, self.workdir)
        try:
            out = os.open(self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o666, dir_fd=fd)
            with os.fdopen(out, "a") as f:
                if f.tell() == 0:
                    f.write(_line(COLUMNS))
                f.writelines(_line(row[c] for c in COLUMNS) for row in rows)
        finally:
            os.close(fd)

    def _row(self, single: Any, attempt: Any) -> Dict[str, Any]:
        task, result = attempt.task, attempt.result
        r, used = task.resources, result.usage
        wildcards = ",".join(f"{k}={v}" for k, v in getattr(single, "wildcards", {}).items())
        status = "ok" if result.ok else sizing.OUT_OF_MEMORY if result.out_of_memory else "failed"
        # a group run by Snakemake in one task has no rule of its own: its label names it
        rule = getattr(getattr(single, "rule", None), "name", None) or task.label
        values = (
            rule, task.job_id, task.attempt, wildcards,
            status, result.exit_code, r.cpus, r.mem_mb,
            None if r.runtime_s is None else r.runtime_s / 60, used.queue_s, result.seconds,
            used.cpu_s, used.peak_mb, used.read_mb, used.written_mb, used.staged_in_mb,
            used.staged_out_mb, self.backend, task.image,
            _when(attempt.submitted_at), _when(attempt.ended_at),
        )
        return dict(zip(COLUMNS, values))


def _when(t: Optional[float]) -> Optional[str]:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _line(values: Iterable[Any]) -> str:
    return "\t".join(_cell(v) for v in values) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return " ".join(str(value).split())  # no tab or line break inside a cell
