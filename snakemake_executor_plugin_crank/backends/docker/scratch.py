"""The host side of warm runners: the run's temporary directory (with a file naming its
owner, so that a later run can tell it stale when this one was killed hard), each
runner's private /tmp, /dev/shm and log scratch directories, emptied after every task
from the host, and the exec's logs moved from the scratch directory into the task's
log directory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from ...task import TaskSpec
from .. import logs
from ..live import LiveLog

# the file naming the owner of a runners' temporary directory (stale-directory removal)
OWNER = "owner.json"
# a log is read and written this much at a time
COPY_AT_ONCE = 8 << 20


def engine_of(base_url: Optional[str]) -> str:
    """The engine a run's runners are on, as its owner file names it."""
    return base_url or os.environ.get("DOCKER_HOST") or "default"


def make_root(workdir: str, base_url: Optional[str], run_id: str) -> str:
    """The run's temporary directory, with a file naming its owner."""
    root = tempfile.mkdtemp(prefix="crank-warm-")
    owner = {
        "workdir": workdir,
        "engine": engine_of(base_url),
        "run": run_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    with open(os.path.join(root, OWNER), "w") as f:
        json.dump(owner, f)
    return root


def roots_of(workdir: str, base_url: Optional[str]) -> List[Tuple[str, str]]:
    """(run id, directory) of every runners' temporary directory of this workdir and
    engine, whatever run made it."""
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith("crank-warm-")]
    except OSError:
        return []
    found = []
    for name in names:
        root = os.path.join(base, name)
        try:
            with open(os.path.join(root, OWNER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file: another version, or not crank's)
        if not isinstance(owner, dict):
            continue
        if owner.get("workdir") != workdir or owner.get("engine") != engine_of(base_url):
            continue
        found.append((str(owner.get("run")), root))
    return found


def rmtree(path: str) -> None:
    def retry(function, p, _info):
        with contextlib.suppress(OSError):
            _writable_then_retry(function, p, _info)

    shutil.rmtree(path, onerror=retry)


# what a running task wrote to one of its logs from an offset on (None: nothing to read)
Reader = Callable[[str, int], Optional[bytes]]


def host_reader(scratch: str) -> Reader:
    """Reads ``<scratch>/<name>`` on this machine (a bound runner's log scratch directory),
    at most COPY_AT_ONCE bytes at a time, to come back soon."""
    def read(name: str, offset: int) -> Optional[bytes]:
        try:
            fd = logs.open_job_file(os.path.join(scratch, name))
        except OSError:
            return None  # not written yet, or not a file the host reads
        try:
            return os.pread(fd, COPY_AT_ONCE, offset)
        except OSError:
            return None
        finally:
            os.close(fd)
    return read


def copy_new(read: Reader, live: Mapping[str, LiveLog]) -> None:
    """What the running task wrote to its logs since the last copy, appended to its live logs."""
    for log in live.values():
        if log.failed or log.ended:
            continue
        data = read(log.name, log.size)
        if data:
            log.append(data)


class LiveCopier:
    """Every INTERVAL_S, what the running tasks wrote to their scratch logs, copied into
    their live logs (``running()``: (its reader, live logs, their lock) of each), on a
    daemon thread of its own until ``stopping`` is set."""

    INTERVAL_S = 2.0

    def __init__(self, running: Callable[[], List[Tuple[Reader, Mapping[str, LiveLog], threading.Lock]]],
                 stopping: threading.Event):
        self.running = running
        self.stopping = stopping
        threading.Thread(target=self._loop, name="crank-live-logs", daemon=True).start()

    def _loop(self) -> None:
        while not self.stopping.wait(self.INTERVAL_S):
            try:
                for read, live, lock in self.running():
                    with lock:
                        copy_new(read, live)
            except Exception:  # noqa: BLE001 - live logs only: the next pass tries again
                continue


def move_logs(scratch: str, task: TaskSpec, live: Mapping[str, LiveLog] = {}) -> Tuple[Tuple[str, ...], str]:
    """Move ``<scratch>/<name>.stdout|.stderr`` into ``<log_dir>/<name>.*``; return the
    files saved and the last lines of stderr, read from the scratch copy. The task could
    write its scratch directory: only regular files are taken, never through a symlink
    (see logs.py). A log that cannot be moved (disk full, no permission, not a regular
    file) is dropped, never an error, and leaves no truncated file under its name; the
    tail then says what was not saved. A log shown while the task ran (``live``, by
    suffix) is continued with the rest instead (live.py)."""
    tail, saved, problems = "", [], []
    dir_fd = None
    try:
        for suffix in (".stdout", ".stderr"):
            name = task.name + suffix
            src = os.path.join(scratch, name)
            try:
                fd = logs.open_job_file(src)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(logs.problem(name, e))
                _unlink(src)
                continue
            try:
                if suffix == ".stderr":
                    tail = logs.read_tail(fd)
                if dir_fd is None:
                    dir_fd = logs.open_log_dir(task)
                shown = live.get(suffix)
                if shown is not None and shown.continued:
                    _continue(fd, shown.continuation(dir_fd))
                else:
                    _move(fd, src, dir_fd, name)
                saved.append(os.path.join(task.log_dir, name))
            except OSError as e:
                problems.append(logs.problem(name, e))
                if dir_fd is not None:
                    logs.remove_log(dir_fd, name)
            finally:
                os.close(fd)
                _unlink(src)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return tuple(saved), logs.with_unsaved(tail, problems)


def _move(fd: int, src: str, dir_fd: int, name: str) -> None:
    """Put the open scratch file ``fd`` (at ``src``) under ``name`` in the log directory:
    renamed when on the same file system and still the file opened, else copied from
    ``fd``, into a file created without following a symlink."""
    try:
        os.replace(src, name, dst_dir_fd=dir_fd)
        moved = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        opened = os.fstat(fd)
        if (moved.st_dev, moved.st_ino) == (opened.st_dev, opened.st_ino):
            return
        logs.remove_log(dir_fd, name)  # replaced after it was opened: not what was checked
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    with os.fdopen(fd, "rb", closefd=False) as source, os.fdopen(logs.create_file(dir_fd, name), "wb") as sink:
        source.seek(0)
        shutil.copyfileobj(source, sink)


def _continue(fd: int, sink) -> None:
    try:
        while chunk := os.read(fd, COPY_AT_ONCE):
            sink.write(chunk)
    except BaseException:
        sink.abandon()
        raise
    sink.close()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def empty(root: str, keep: Sequence[str], mode: int = 0o1777) -> None:
    """Remove everything under ``root`` except the directories of ``keep`` (relative mount
    targets) and the path down to them; entries are removed on the host, where nothing is
    mounted under them."""
    parents = {os.path.dirname(k) for k in keep}
    for k in keep:
        while k:
            k = os.path.dirname(k)
            parents.add(k)
    _empty_dir(root, "", set(keep), parents)
    os.chmod(root, mode)


def _empty_dir(root: str, rel: str, keep: set, parents: set) -> None:
    for entry in os.scandir(os.path.join(root, rel)):
        sub = os.path.join(rel, entry.name)
        if sub in keep:
            continue
        if sub in parents and entry.is_dir(follow_symlinks=False):
            _empty_dir(root, sub, keep, parents)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, onerror=_writable_then_retry)
        else:
            os.unlink(entry.path)


def _writable_then_retry(function, path, _info):
    os.chmod(os.path.dirname(path), stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
    function(path)
