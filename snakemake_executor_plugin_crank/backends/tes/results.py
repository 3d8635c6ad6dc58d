"""What a finished TES task left: its logs, its exit code and its products, each product
installed at its path whole or not at all."""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from typing import Collection, Iterable, Mapping, Optional, Sequence, Tuple

import tes

from ...staging.stage import Stager
from ...task import TaskResult, TaskSpec, Usage
from .. import cgroup
from ..live import LiveLog
from ..logs import save_logs
from . import layout, products


class Collector:
    """Downloads through ``fetcher`` into directories under ``tmp_root``."""

    def __init__(self, fetcher: Stager, tmp_root: str):
        self.fetcher = fetcher
        self.tmp_root = tmp_root

    def collect(self, full: tes.Task, prefix: str, handle: str, task: TaskSpec,
                staged_in: Optional[int] = None, live: Mapping[str, LiveLog] = {}) -> TaskResult:
        """The outcome of ``task``, whose terminal TES task is ``full`` and whose objects lie
        under ``prefix``; ``staged_in``: the bytes of its local inputs; ``live``: its logs as
        shown while it ran."""
        state = full.state or "UNKNOWN"
        last = full.logs[-1] if full.logs else tes.TaskLog()
        exec_log = last.logs[-1] if last.logs else tes.ExecutorLog()
        seconds = ((exec_log.end_time - exec_log.start_time).total_seconds()
                   if exec_log.start_time and exec_log.end_time else None)
        system = [line for entry in (last.system_logs or []) for line in entry.splitlines()]
        if state == "COMPLETE":
            tmp, fetched = self._download(prefix, handle, task)
        else:
            tmp, fetched = self._download_logs(prefix, handle, task)
        try:
            stdout, stderr = (os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")) if tmp else ("", "")
            files, tail = save_logs(
                task,
                _read(stdout) if tmp and os.path.exists(stdout) else _text(exec_log.stdout),
                _read(stderr) if tmp and os.path.exists(stderr) else _text(exec_log.stderr),
                live,
            )
            used = dataclasses.replace(
                usage(tmp, full.creation_time, exec_log.start_time),
                staged_in_mb=None if staged_in is None else staged_in / 1e6,
                staged_out_mb=fetched / 1e6)
            if state != "COMPLETE":
                reason = f"TES state {state}"
                if system:
                    reason += ": " + system_summary(system)
                return TaskResult(ok=False, exit_code=exec_log.exit_code, reason=reason, stderr_tail=tail,
                                  log_files=files, seconds=seconds, usage=used)
            code = _exit_code(tmp)
            if code is None:
                return TaskResult(ok=False, exit_code=exec_log.exit_code,
                                  reason="the task came back without its exit code (TES state COMPLETE)",
                                  stderr_tail=tail, log_files=files, seconds=seconds, usage=used)
            # a failed job's own log files come back too (run.sh collected only those)
            warnings = products.install_all(tmp, task, None if code == 0 else layout.log_names(task))
            return TaskResult(ok=code == 0, exit_code=code, stderr_tail=tail, log_files=files,
                              seconds=seconds, reason="; ".join(warnings) or None, usage=used)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, prefix: str, handle: str, task: TaskSpec,
                  only: Optional[Collection[str]] = None) -> Tuple[str, int]:
        """Everything the task uploaded (of the top-level names in ``only``, when given), in a
        fresh local directory (whole or nothing), and its bytes; the outputs a later task reads
        are also put under their content address."""
        dest = os.path.join(self.tmp_root, handle)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        share = {layout.product_name(n) for n, p in enumerate(task.products) if p.read_later}
        return dest, self.fetcher.fetch_dir(prefix, dest, share, only)

    def _download_logs(self, prefix: str, handle: str, task: TaskSpec) -> Tuple[Optional[str], int]:
        """stdout/stderr of a task that did not complete, where the server uploaded them
        (Funnel uploads nothing after a failed executor), and their bytes."""
        dest, fetched = self._download(prefix, handle, task, only=("stdout", "stderr", layout.EXIT, layout.USAGE))
        if os.listdir(dest):
            return dest, fetched
        os.rmdir(dest)
        return None, 0


def system_summary(lines: Sequence[str], limit: int = 3) -> str:
    """The server's own error lines (Funnel: logfmt with level='error'), else its last lines."""
    errors = [line for line in lines if "level='error'" in line or 'level="error"' in line
              or "level=error" in line]
    chosen = (errors or list(lines))[-limit:]
    return " | ".join(line if len(line) <= 300 else line[:297] + "..." for line in chosen)


def _read(path: str) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _text(value: Optional[str]) -> Iterable[bytes]:
    return [value.encode()] if value else []


def usage(tmp: Optional[str], created: Optional[datetime.datetime],
          started: Optional[datetime.datetime]) -> Usage:
    """What the task's container counted (script.USAGE_LINES), and how long the task waited
    between its creation and the start of its command."""
    queue_s = None
    if created and started:
        queue_s = max(0.0, (_utc(started) - _utc(created)).total_seconds())
    try:
        with open(os.path.join(tmp, layout.USAGE)) as f:
            text = f.read()
    except (OSError, TypeError):
        text = ""
    return cgroup.usage(text, queue_s)


def _utc(t: datetime.datetime) -> datetime.datetime:
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _exit_code(tmp: Optional[str]) -> Optional[int]:
    try:
        with open(os.path.join(tmp, layout.EXIT)) as f:
            return int(f.read().strip())
    except (OSError, ValueError, TypeError):
        return None
