"""Logs that grow while their task runs: a task's stdout and stderr under the names the
failure message gives (``<log_dir>/<task>.stdout|.stderr``), appended to as the backend
learns what the task wrote, so that ``tail -f`` follows a running job.

The complete log is still saved when the task ends (logs.save_logs): when what was shown
live is the start of it, only the rest is appended, so a ``tail -f`` sees every byte once;
otherwise (a live view with a gap, from a server that keeps only a tail) the complete log
replaces it. A live log that cannot be written (disk full) is removed and not tried again
for that task. Memory stays bounded whatever the task writes: bytes go straight to the
file; only the last WINDOW bytes are kept, to place a server's next tail.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from typing import Dict, Optional

from ..task import TaskSpec
from . import logs

# what a follower of tails keeps of the end of the log: more than a server's tail (Funnel: 10 kB)
WINDOW = 64 * 1024
MIN_OVERLAP = 64
GAP = b"\n[crank: output missed here; the complete log is saved when the job ends]\n"


class LiveLog:
    """One log file of a running task: one writer at a time, and the end's saving, which
    may come from another thread (``end_appending`` waits for a write in progress)."""

    def __init__(self, task: TaskSpec, suffix: str):
        self.task = task
        self.name = task.name + suffix
        self.size = 0
        self.digest = hashlib.sha256()
        self.end = bytearray()  # the last WINDOW bytes written
        self.broken = False  # could not be written, or has a gap: not the start of the log
        self.failed = False
        self.ended = False  # no more appending (the task ended)
        self.handed = False  # to the end's saving, which continues the file
        self._lock = threading.Lock()

    def append(self, data: bytes) -> None:
        with self._lock:
            self._append(data)

    def end_appending(self) -> None:
        with self._lock:
            self.ended = True

    @property
    def continued(self) -> bool:
        """Whether the end's saving continues this file (it holds something, and no saving
        took it over yet)."""
        return self.size > 0 and not self.failed and not self.handed

    def _append(self, data: bytes) -> None:
        if not data or self.failed or self.ended:
            return
        try:
            # opened for each append: a descriptor held for a task's life would run out
            # with many tasks running, and one of a task never collected would leak
            dir_fd = logs.open_log_dir(self.task)
            try:
                fd = logs.open_append(dir_fd, self.name) if self.size else logs.create_file(dir_fd, self.name)
            finally:
                os.close(dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError:
            self._give_up()
            return
        self.size += len(data)
        self.digest.update(data)
        self.end += data
        if len(self.end) > 2 * WINDOW:
            del self.end[:-WINDOW]

    def follow_tail(self, tail: bytes) -> None:
        """What follows from a server's latest tail of the log, whose first bytes may overlap
        what was shown already. A tail that shares nothing with the end shown means bytes
        were missed: a line says so."""
        if not tail:
            return
        with self._lock:
            overlap = _overlap(bytes(self.end), tail)
            if overlap == 0 and self.size:
                self.broken = True
                self._append(GAP)
            self._append(tail[overlap:])

    def _give_up(self) -> None:
        self.failed = self.broken = True
        try:
            dir_fd = logs.open_log_dir(self.task)
        except OSError:
            return
        try:
            logs.remove_log(dir_fd, self.name)
        finally:
            os.close(dir_fd)

    def continuation(self, dir_fd: int) -> "Continuation":
        """Where the complete log goes at the task's end (logs.save_logs)."""
        self.end_appending()
        self.handed = True
        return Continuation(self, dir_fd)


def live_logs(task: TaskSpec) -> Dict[str, LiveLog]:
    """A task's stdout and stderr as live logs, by suffix."""
    return {suffix: LiveLog(task, suffix) for suffix in (".stdout", ".stderr")}


def _overlap(end: bytes, tail: bytes) -> int:
    """The length of the longest end of ``end`` that ``tail`` starts with: the first place
    in ``end`` from which the rest of it equals the start of ``tail``. A few bytes in common
    (fewer than MIN_OVERLAP, unless one of the two is that short) are taken for chance."""
    p = max(0, len(end) - len(tail))
    while (p := end.find(tail[:1], p)) >= 0:
        n = len(end) - p
        if end[p:] == tail[:n]:  # the longest: shorter ones are chance all the more
            return n if n >= min(MIN_OVERLAP, len(end), len(tail)) else 0
        p += 1
    return 0


class Continuation:
    """The complete log streamed in at the task's end, after a live log: while it repeats
    what the live log holds it goes to a temporary file; once it is known to start with
    exactly that, it is appended to the live log, else the temporary file replaces it."""

    def __init__(self, live: LiveLog, dir_fd: int):
        self.live = live
        self.dir_fd = dir_fd
        self.seen = 0
        self.digest = hashlib.sha256()
        self.tmp = f".{live.name}.crank-{uuid.uuid4().hex[:12]}"
        self.sink = os.fdopen(logs.create_file(dir_fd, self.tmp), "wb")
        # None until the bytes the live log holds have come in again
        self.same: Optional[bool] = False if live.broken else None

    def write(self, chunk: bytes) -> None:
        if self.same is None:
            part = chunk[:self.live.size - self.seen]
            self.digest.update(part)
            self.seen += len(part)
            self.sink.write(part)
            chunk = chunk[len(part):]
            if self.seen == self.live.size:
                self._decide()
        if chunk:
            self.sink.write(chunk)

    def _decide(self) -> None:
        self.same = self.digest.digest() == self.live.digest.digest()
        if self.same:
            try:
                live = os.fdopen(logs.open_append(self.dir_fd, self.live.name), "ab")
            except OSError:  # gone (removed by hand): the temporary file, which has it all, takes its place
                self.same = False
                return
            self.sink.close()
            logs.remove_log(self.dir_fd, self.tmp)
            self.sink = live

    def close(self) -> None:
        """The log complete under its name; raises OSError as a write would. A log shorter
        than what was shown (a server's last tail, a stream cut short) leaves the shown one."""
        if self.same is None:
            return self.abandon()
        try:
            self.sink.close()
            if not self.same:
                os.replace(self.tmp, self.live.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            logs.remove_log(self.dir_fd, self.tmp)
            raise

    def abandon(self) -> None:
        try:
            self.sink.close()
        except OSError:
            pass
        logs.remove_log(self.dir_fd, self.tmp)

