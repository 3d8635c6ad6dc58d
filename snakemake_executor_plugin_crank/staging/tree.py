"""What a set of local inputs is on the client, entry by entry, for a task to rebuild as it is.

A task on another machine must see each input as the local executor would show it: a regular
file with its permission bits and modification time, a directory of such files and
directories, and a symbolic link where the client has one, with the same target text and
what it leads to there as well. ``plan(paths)`` walks the inputs without following a link and
lists every entry the task must make:

- a file or a directory: its mode and modification time (a directory's whole content too);
- a symlink: its target text; then what it leads to is planned as well, at the path the
  target text names there, unless that is a directory on the way to the link (``up -> ..``,
  which would repeat the tree without end; it is there anyway), a path under ``/dev``,
  ``/proc`` or ``/sys`` (the container has its own), or nothing (a dangling link stays one);
- a symlink among the directories on the way to an input (``data -> /big/data`` for the input
  ``data/x.fq``) is planned as a link too, and the input where it leads, so that no path is
  both a directory and a link in the task. Top-level directories (``/scratch``) are taken as
  they are: a task's writable volumes are made below them.

The directories on the way to the entries (``ancestors``) can be listed with their modes and
times too, so a task can give them the client's where it may.

A FIFO, a socket or a device cannot travel: one line names it. Nothing is opened here.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..errors import CrankError

FILE, DIR, LINK = "file", "dir", "link"
# a link leading here is made, and what it leads to left to the container's own
SYSTEM = ("/dev", "/proc", "/sys")
MAX_HOPS = 40  # symlinks followed in one path, as the kernel's ELOOP limit


@dataclass(frozen=True)
class Entry:
    path: str  # absolute, normalized, as the task sees it
    kind: str  # FILE, DIR or LINK
    mode: int = 0  # permission bits (S_IMODE); 0 for a link
    mtime_ns: int = 0
    link: str = ""  # a link's target text
    # a file's lstat, which for a regular file is its stat: the digest cache needs no other
    st: os.stat_result | None = field(default=None, compare=False, repr=False)


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    # each local input: (its path, the path of its entry: another where a symlinked
    # directory on the way leads elsewhere)
    roots: list[tuple[str, str]] = field(default_factory=list)

    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == FILE]

    def below(self, directory: str) -> list[Entry]:
        """The entries inside ``directory`` (not itself)."""
        prefix = directory.rstrip("/") + "/"
        return [e for e in self.entries if e.path.startswith(prefix)]


def describe(mode: int) -> str:
    """What a file of this (st_mode) type is, for a message."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file, directory or symlink"


def special(mode: int) -> str | None:
    """What a file of this (st_mode) type is when it cannot be sent to a job, else None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return describe(mode)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class _Planner:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._links: dict[str, str | None] = {}  # client path -> its target text, None if no link

    def link_text(self, path: str) -> str | None:
        if path not in self._links:
            try:
                self._links[path] = os.readlink(path)
            except OSError:
                self._links[path] = None
        return self._links[path]

    def resolve(self, path: str, follow_last: bool) -> str | None:
        """Where ``path`` leads in the task, component by component as the kernel goes: a
        symlink on the way (below the top level) is planned as a link and followed. None when
        the links loop."""
        pending = path.split("/")[::-1]
        done = ""
        hops = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                done = os.path.dirname(done) if done else ""
                done = "" if done == "/" else done
                continue
            candidate = f"{done}/{name}"
            if (not pending and not follow_last) or done == "":
                done = candidate  # the last component as it is; a top-level one taken as a directory
                continue
            entry = self.entries.get(candidate)
            text = entry.link if entry is not None and entry.kind == LINK else (
                None if entry is not None else self.link_text(candidate))
            if text is None:
                done = candidate
                continue
            if entry is None:
                self._add(Entry(candidate, LINK, 0, _mtime(candidate), text))
            hops += 1
            if hops > MAX_HOPS:
                return None
            if text.startswith("/"):
                done = ""
            pending.extend(text.split("/")[::-1])
        return done or "/"

    def _add(self, entry: Entry) -> None:
        self.entries[entry.path] = entry

    def forget_since(self, count: int) -> None:
        """Forget the entries planned after the first ``count``."""
        for path in list(self.entries)[count:]:
            del self.entries[path]

    def place(self, path: str, what: str, missing_ok: bool = False) -> bool:
        """Plan what the client has at ``path`` (whose directories on the way are resolved).
        ``what`` says in a message what it is to the job. False when there is nothing (with
        ``missing_ok``, also nothing that can be looked at)."""
        if path in self.entries:
            return True
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            if missing_ok:
                return False
            raise CrankError(f"{path} ({what}): cannot read it ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            self._add(Entry(path, LINK, 0, st.st_mtime_ns, os.readlink(path)))
            self._links[path] = self.entries[path].link
            target = self.resolve(path, follow_last=True)
            if target is None or _under(path, target) or any(_under(target, s) for s in SYSTEM):
                return True  # a loop, or a directory on the way to the link: nothing more
            self.place(target, f"the target of the symlink {path}")
            return True
        if stat.S_ISREG(st.st_mode):
            self._add(Entry(path, FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st=st))
            return True
        if not stat.S_ISDIR(st.st_mode):
            raise CrankError(
                f"{path} ({what}) is {describe(st.st_mode)}, which crank cannot send to a task; "
                "give the job a regular file or directory instead"
            )
        self._add(Entry(path, DIR, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
        try:
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            raise CrankError(f"cannot read directory {path}: {e.strerror or e}") from None
        for name in names:
            self.place(os.path.join(path, name), f"inside the directory {path}")
        return True


def plan(paths: list[str], missing_ok: bool = False) -> Plan:
    """Every entry the task needs for the local inputs ``paths`` (absolute), in a stable
    order. A path that does not exist is an error; with ``missing_ok`` it is left out, as
    is one that cannot be looked at, and so are the links on the way to it."""
    planner = _Planner()
    result = Plan()
    for path in paths:
        path = os.path.normpath(path)
        planned = len(planner.entries)
        task_path = planner.resolve(path, follow_last=False)
        if task_path is not None and planner.place(task_path, "an input", missing_ok):
            result.roots.append((path, task_path))
        elif missing_ok:
            planner.forget_since(planned)
        else:
            raise CrankError(f"input {path}: no such file or directory")
    result.entries = list(planner.entries.values())
    return result


def _mtime(path: str) -> int:
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return 0


def ancestors(paths: list[str]) -> list[Entry]:
    """The directories on the way to ``paths`` (entries of a plan) that are not among them
    (``/`` left out), with the client's modes and times, so that a task can give them those
    too; one that cannot be read is left out."""
    known = set(paths)
    found: dict[str, Entry] = {}
    for path in paths:
        d = os.path.dirname(path)
        while d != "/" and d not in known and d not in found:
            try:
                st = os.stat(d)
            except OSError:
                break
            found[d] = Entry(d, DIR, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            d = os.path.dirname(d)
    return sorted(found.values(), key=lambda e: e.path)
