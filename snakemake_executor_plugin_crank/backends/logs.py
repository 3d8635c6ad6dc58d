"""Saving a task's stdout and stderr where Snakemake can show them (aux logs), and the
last lines of stderr for the failure message.

A job can write where its logs go: the log directory is under the workdir, which every
task has read-write, and warm runners' scratch logs are in a directory the task sees. So
the host never follows a symlink a job may have planted there (it could name any file of
the invoking user, for reading or writing), reads and writes regular files only, and
never blocks on a FIFO."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..task import TaskSpec

TAIL_LINES = 20
# the tail is the last TAIL_LINES lines of the last TAIL_BYTES of stderr: memory and
# work stay bounded whatever the job writes (a progress bar redrawn with \r for hours)
TAIL_BYTES = 64 * 1024

_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StderrTail:
    """The last lines of a stream, kept chunk by chunk in linear time and bounded memory."""

    def __init__(self) -> None:
        self.window = bytearray()
        self.cut = False  # bytes before the window were dropped

    def feed(self, chunk: bytes) -> None:
        self.window += chunk
        if len(self.window) > 2 * TAIL_BYTES:  # trimmed in amortized O(1) per byte
            del self.window[:-TAIL_BYTES]
            self.cut = True

    def text(self) -> str:
        window = self.window
        if len(window) > TAIL_BYTES:
            window, cut = window[-TAIL_BYTES:], True
        else:
            cut = self.cut
        return tail_text(bytes(window), cut)


def tail_text(window: bytes, cut: bool) -> str:
    """The last TAIL_LINES lines of ``window``, the end of a stream; when bytes before it
    were dropped (``cut``) its first line is partial and left out, unless it is the only one."""
    if window.endswith(b"\n"):
        window = window[:-1]
    if cut and b"\n" in window:
        window = window[window.index(b"\n") + 1:]
    start = len(window)
    for _ in range(TAIL_LINES):
        start = window.rfind(b"\n", 0, start)
        if start < 0:
            break
    return window[start + 1:].decode("utf-8", "replace")


def open_job_file(path: str) -> int:
    """A read-only descriptor of a file a job wrote: never through a symlink, never
    blocking (a FIFO), a regular file only; raises OSError otherwise."""
    return _regular(os.open(path, os.O_RDONLY | _NOFOLLOW))


def read_tail(fd: int) -> str:
    """The stderr tail of an open log file, as StderrTail keeps it from the stream."""
    size = os.fstat(fd).st_size
    start = max(0, size - TAIL_BYTES)
    return tail_text(os.pread(fd, size - start, start), start > 0)


def open_log_dir(task: TaskSpec) -> int:
    """The task's log directory (see open_dir)."""
    return open_dir(task.log_dir, task.workdir)


def open_dir(path: str, workdir: str) -> int:
    """Directory ``path``, made if missing and opened without following a symlink below
    the workdir (where a job may have put one)."""
    rel = os.path.relpath(path, workdir) if workdir else os.pardir
    if rel.split(os.sep)[0] == os.pardir:
        os.makedirs(path, exist_ok=True)  # outside the workdir: no job writes there
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (p for p in rel.split(os.sep) if p not in ("", os.curdir)):
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symbolic link") from None
                raise
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def create_file(dir_fd: int, name: str) -> int:
    """A new, empty file ``name`` in the directory ``dir_fd``, for writing; a symlink or
    anything but a regular file under that name is refused (OSError)."""
    return _regular(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o666, dir_fd=dir_fd))


def open_append(dir_fd: int, name: str) -> int:
    """The existing regular file ``name`` in the directory ``dir_fd``, for appending."""
    return _regular(os.open(name, os.O_WRONLY | os.O_APPEND | _NOFOLLOW, dir_fd=dir_fd))


def _regular(fd: int) -> int:
    """``fd``, blocking again, when it is a regular file; else closed, and OSError."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def problem(name: str, error: OSError) -> str:
    """What went wrong with one log, for the note in the tail."""
    return f"{name}: {why(error)}"


def why(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symbolic link (not followed)"
    return error.strerror or str(error)


def save_logs(
    task: TaskSpec, stdout: Iterable[bytes], stderr: Iterable[bytes],
    live: Mapping[str, Any] = {},
) -> Tuple[Tuple[str, ...], str]:
    """Stream both logs to ``<log_dir>/<name>.stdout|.stderr``; return the files saved
    and the last lines of stderr. A log that cannot be written (disk full, no
    permission) is skipped, never an error: saving logs must not change a task's
    outcome. The stderr tail is kept either way; a note in it says what was not saved.
    ``live``: the logs shown while the task ran (live.LiveLog), by suffix: continued."""
    tail = StderrTail()
    saved: List[str] = []
    problems: List[str] = []
    dir_fd: Optional[int] = None
    try:
        dir_fd = open_log_dir(task)
    except OSError as e:
        problems.append(problem(task.log_dir, e))

    def stream(name, chunks, on_chunk=None):
        sink = None
        if dir_fd is not None:
            try:
                shown = live.get(name[len(task.name):])
                if shown is not None and shown.continued:
                    sink = shown.continuation(dir_fd)
                else:
                    sink = os.fdopen(create_file(dir_fd, name), "wb")
            except OSError as e:
                problems.append(problem(name, e))
        try:
            for chunk in chunks:
                if on_chunk:
                    on_chunk(chunk)
                if sink is not None:
                    try:
                        sink.write(chunk)
                    except OSError as e:
                        problems.append(problem(name, e))
                        sink = _close(sink)
                        remove_log(dir_fd, name)  # no truncated log under the log's name
        except BaseException:
            if sink is not None and hasattr(sink, "abandon"):
                sink.abandon()  # a stream cut short: what was shown stays
                sink = None
            raise
        finally:
            if sink is not None:
                try:
                    sink.close()
                    saved.append(os.path.join(task.log_dir, name))
                except OSError as e:
                    problems.append(problem(name, e))
                    remove_log(dir_fd, name)

    try:
        stream(task.name + ".stdout", stdout)
        stream(task.name + ".stderr", stderr, tail.feed)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return tuple(saved), with_unsaved(tail.text(), problems)


def with_unsaved(tail: str, problems: Sequence[str]) -> str:
    """The stderr tail, with a note naming the logs that could not be saved."""
    if not problems:
        return tail
    return tail + ("\n" if tail else "") + "(crank could not save the log: " + "; ".join(problems) + ")"


def _close(sink):
    try:
        getattr(sink, "abandon", sink.close)()
    except OSError:
        pass
    return None


def remove_log(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
