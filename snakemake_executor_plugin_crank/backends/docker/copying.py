"""A task's files copied into its container, and what it made copied back, for a Docker
engine that does not see the client's files (sharing.py): through the engine's archive
API, which works on a container that is created and not started yet, or that has ended.

In: the task's local inputs, the old content of its ``update()`` outputs, the workflow's
sources and crank's own files for it, each at its own path as the local executor shows it
(staging/tree.py: files, directories, symlinks and what they lead to, the client's modes,
owners and times to the nanosecond), with the directories on the way to them and to its
products. The tar is made while it is sent: nothing is written on the client first.

Out: each product (output, log, benchmark file) that the container has, unpacked beside
its final path and put in place whole by rename (staging/install.py), with its modes,
symlinks and hard links. Docker's archive gives whole seconds for the times of what a
directory holds; a product's own time keeps its nanoseconds (the engine's path stat).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from ...errors import CrankError
from ...staging import tree
from ...staging.install import install, merge_into
from ...task import Kind, TaskSpec
from ..guard import Guard
from ..paths import under
from . import engine
from .engine import GO_DIR, LOGS

# a file is read and sent this much at a time
CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
# a copied runner's task logs are shown live up to this size (each look sends the whole file)
LIVE_AT_MOST = 4 << 20
# what a link leads to, when the job made it, is brought back through this many links in a row
MAX_LINK_HOPS = 8

Links = List[Tuple[str, str]]  # (a symlink's path on the client, its target text)


# ---- in ------------------------------------------------------------------------------


def put_in(api, cid: str, entries: Sequence[tree.Entry]) -> None:
    """Copy ``entries`` into the container (with_ancestors, or a mirror.Claim's, whose inside
    the container's mount of the volume takes)."""
    engine.put_files(api, cid, stream(entries))


def files_in(task: TaskSpec, crank_files: Sequence[str] = ()) -> Iterator[bytes]:
    """The tar stream, to unpack at ``/``, of everything the task must find at its path;
    planned now (a missing input is said before anything is sent), read while it is sent."""
    return stream(with_ancestors(task, plan_files(task, crank_files)))


def with_ancestors(task: TaskSpec, entries: Sequence[tree.Entry]) -> List[tree.Entry]:
    """``entries`` after the workdir itself and every directory on the way to an entry or a
    product."""
    around = [e.path for e in entries] + [p.path for p in task.products] + [os.path.join(task.workdir, ".")]
    return tree.ancestors(around) + list(entries)


def stream(entries: Sequence[tree.Entry]) -> Iterator[bytes]:
    for entry in entries:
        yield from _member(entry)
    yield b"\0" * (2 * _BLOCK)


def _member(entry: tree.Entry) -> Iterator[bytes]:
    info = tarfile.TarInfo(entry.path.lstrip("/"))
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": f"{info.mtime}.{entry.mtime_ns % 1_000_000_000:09d}"}
    if entry.kind == tree.LINK:
        info.type, info.linkname = tarfile.SYMTYPE, entry.link
        _owner(info, entry.path)
        yield _header(info)
        return
    if entry.kind == tree.DIR:
        info.type, info.mode = tarfile.DIRTYPE, entry.mode
        _owner(info, entry.path)
        yield _header(info)
        return
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CrankError(f"cannot read {entry.path} to copy it into the container ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        info.size, info.mode, info.uid, info.gid = st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        yield _header(info)
        left = st.st_size
        while left:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise CrankError(f"{entry.path} got shorter while it was copied into the container")
            left -= len(chunk)
            yield chunk
        yield b"\0" * (-st.st_size % _BLOCK)
    finally:
        os.close(fd)


def _owner(info: tarfile.TarInfo, path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    info.uid, info.gid = (st.st_uid, st.st_gid) if st else (os.getuid(), os.getgid())


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# ---- out -----------------------------------------------------------------------------


def take_products(api, cid: str, task: TaskSpec) -> List[str]:
    """Put in place every product of the task that the container has (Snakemake reports
    the missing ones itself), then what their links lead to where the job made it
    (guard.py); the warnings to give."""
    links: Links = []
    for product in task.products:
        got = engine.get_files(api, cid, product.path)
        if got is not None:
            links += take(got, product.path)
    guard = Guard(task)
    seen = {p.path for p in task.products}
    warnings = []
    for _ in range(MAX_LINK_HOPS):  # what a link leads to may hold links too
        further: Links = []
        for link, text in links:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(link), text))
            if target in seen:
                continue
            seen.add(target)
            refused = guard.refuses(target)
            if refused == "outside the workdir" and not os.path.lexists(target):
                warnings.append(f"output {link} is a link to {target}, which the job made outside the "
                                "workdir: only the link comes back")
            if refused is not None:
                continue
            got = engine.get_files(api, cid, target)
            if got is None:
                continue  # dangling in the container as well
            if not (got[1] or {}).get("mode", 0) & GO_DIR and os.path.isdir(target) and not os.path.islink(target):
                warnings.append(f"output {link} leads to {target}, which crank does not bring back "
                                "(a directory is there)")
                continue
            further += take(got, target, merge=True)
        links = further
    return warnings


def take(got, dest: str, merge: bool = False) -> Links:
    """Unpack the archive ``got`` (a stream and its path stat) beside ``dest``, then put it
    at ``dest`` whole (with ``merge``, a directory entry by entry into what is there); the
    symlinks it holds, with their target text."""
    stream, path_stat = got
    top = (path_stat or {}).get("name") or os.path.basename(dest)
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.crank-", dir=parent)
    except OSError as e:
        raise CrankError(f"cannot put an output at {dest}: {e.strerror or e}") from None
    try:
        safe = _Safe(top)
        with tarfile.open(fileobj=_Reader(stream), mode="r|") as tar:
            tar.extractall(tmp, filter=safe)
        src = os.path.join(tmp, top)
        if not os.path.lexists(src):
            raise CrankError(f"the Docker engine sent no {dest}")
        mtime_ns = engine.stat_mtime_ns(path_stat or {})
        if mtime_ns is not None:
            os.utime(src, ns=(os.lstat(src).st_atime_ns, mtime_ns), follow_symlinks=False)
        (merge_into if merge and os.path.isdir(src) and not os.path.islink(src) else install)(src, dest)
    except (OSError, tarfile.TarError) as e:
        raise CrankError(f"cannot copy {dest} out of its container ({getattr(e, 'strerror', None) or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = os.path.dirname(dest)
    return [(os.path.join(base, name), text) for name, text in safe.links.items()]


def read_small(api, cid: str, path: str, at_most: int, offset: int = 0) -> Optional[bytes]:
    """``at_most`` bytes from ``offset`` on of the file at ``path`` in the container, or
    None. The archive API sends the whole file: what comes before ``offset`` is read and
    dropped."""
    got = engine.get_files(api, cid, path)
    if got is None:
        return None
    try:
        with tarfile.open(fileobj=_Reader(got[0]), mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    data = tar.extractfile(member)
                    while offset > 0:
                        dropped = len(data.read(min(offset, CHUNK)))
                        if not dropped:
                            return None
                        offset -= dropped
                    return data.read(at_most)
    except tarfile.TarError:
        return None
    return None


def log_reader(api, cid: str) -> Callable[[str, int], Optional[bytes]]:
    """Reads what a task in a copied runner wrote to ``LOGS/<name>`` (scratch.Reader), for
    its live logs: each read brings the whole file again, so a log's first LIVE_AT_MOST
    bytes are shown while the task runs, and the whole of it when it ends."""
    def read(name: str, offset: int) -> Optional[bytes]:
        if offset >= LIVE_AT_MOST:
            return None
        return read_small(api, cid, f"{LOGS}/{name}", LIVE_AT_MOST - offset, offset)
    return read


class _Safe:
    """The tar filter for what a container sends: every member at or below ``top``, no
    ``..``, nothing through a symlink of the archive, only files, directories and links;
    the rest is left out."""

    def __init__(self, top: str):
        self.top = top
        self.links: Dict[str, str] = {}  # name -> target text

    def __call__(self, member: tarfile.TarInfo, dest: str) -> Optional[tarfile.TarInfo]:
        if not self._inside(member.name):
            return None
        if member.islnk() and not self._inside(member.linkname):
            return None
        if member.issym():
            self.links[member.name] = member.linkname
        elif not (member.isreg() or member.isdir() or member.islnk()):
            return None
        return member

    def _inside(self, name: str) -> bool:
        parts = name.split("/")
        return (parts[0] == self.top and ".." not in parts and "" not in parts
                and not any("/".join(parts[:n]) in self.links for n in range(1, len(parts))))


class _Reader(io.RawIOBase):
    """An iterator of bytes read as a file, for tarfile's stream mode."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.left = memoryview(b"")  # sliced without a copy

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.left:
            try:
                self.left = memoryview(next(self.chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.left))
        buffer[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


# ---- a warm runner's files -----------------------------------------------------------

# a runner whose tasks' files are copied runs this many tasks at most: it keeps what they
# were sent and made (disk on the engine, and bookkeeping that each task's checks walk)
RUNNER_JOBS = 50
# where a runner keeps a task's scratch files and its logs: emptied after each task
SCRATCH = ("/tmp", "/dev/shm", LOGS)


def empty_command(workdir: str) -> str:
    """The shell command that empties a runner's scratch directories, but one that holds
    the workdir (the engine's copy of it is mounted there: mirror.py)."""
    dirs = [d for d in SCRATCH if not under(workdir, d)]
    return "rm -rf " + " ".join(f"{d}/* {d}/.[!.]* {d}/..?*" for d in dirs)


def scratch_dir(user: str) -> Iterator[bytes]:
    """The tar that makes a runner's LOGS directory, its user's alone."""
    info = tarfile.TarInfo(LOGS.lstrip("/"))
    info.type, info.mode = tarfile.DIRTYPE, 0o700
    info.uid, info.gid = (int(n) for n in user.split(":"))
    return iter([_header(info), b"\0" * (2 * _BLOCK)])


def send_to_runner(api, runner, entries: Sequence[tree.Entry], into_volume: Sequence[tree.Entry]) -> None:
    """Copy into the runner (warm.py) what the task needs outside the workdir (``entries``:
    a mirror.Claim's outside) that it does not have as the client has it (a file or link
    sent to it before, unchanged since, is not sent again), and in the same archive
    ``into_volume``, which the runner's mount of the volume takes (the claim's inside)."""
    known = {e.path: identity(e) for e in entries if e.kind != tree.DIR}
    fresh = [e for e in entries if e.kind == tree.DIR or runner.sent.get(e.path) != known[e.path]]
    engine.put_files(api, runner.id, stream(fresh + list(into_volume)))
    runner.sent.update(known)
    runner.dirs.update(e.path for e in entries if e.kind == tree.DIR)


def fits(runner, task: TaskSpec) -> bool:
    """Whether the runner may run the task: it has run fewer than RUNNER_JOBS tasks (what it
    holds grows with each), holds nothing at the task's products (an earlier task there made
    or was sent something at that path; Snakemake removed it on the client), and made none of
    the task's directory inputs (what it holds there may be more than the client has: a failed
    attempt's files, which a copy over it would leave)."""
    if runner.jobs >= RUNNER_JOBS:
        return False
    for product in task.products:
        if product.path in runner.sent and not product.update:
            return False
        if _made_at_or_above(runner, product.path) or any(under(made, product.path) for made in runner.made):
            return False
    return not any(i.kind is Kind.DIRECTORY and (_made_at_or_above(runner, i.path)
                                                 or any(under(made, i.path) for made in runner.made))
                   for i in task.inputs)


def collect_from_runner(api, runner, task: TaskSpec) -> List[str]:
    """Put the task's products in place, and its log scratch files (runners.LOGS) in the
    runner's host directory ``runner.logs``; the warnings to give."""
    runner.jobs += 1
    warnings = take_products(api, runner.id, task)
    made = [p.path for p in task.products if not under(p.path, task.workdir)]  # else in the volume
    runner.made.update(made)
    runner.dirs.update(_parents(made))
    got = engine.get_files(api, runner.id, LOGS)
    if got is not None:
        take(got, runner.logs)
    return warnings


def forget_scratch(runner) -> None:
    """What the runner was sent or made under its scratch directories is gone (an input
    under /tmp, say): sent again when a task needs it."""
    def kept(path: str) -> bool:
        return not any(under(path, d) for d in SCRATCH)

    runner.sent = {p: known for p, known in runner.sent.items() if kept(p)}
    runner.made = {p for p in runner.made if kept(p)}
    runner.dirs = {p for p in runner.dirs if kept(p)}


def forget_missing(runner, changed: Set[str]) -> None:
    """What the runner was sent that its file system no longer shows as added or changed was
    removed by a task: sent again when a task needs it. (A file a task rewrote in place
    still shows as added: the engine cannot tell.)"""
    runner.sent = {p: known for p, known in runner.sent.items() if p in changed}


def expected(runner, path: str) -> bool:
    """Whether a change at ``path`` in the runner's own file system is one that tasks' files
    explain: what was sent or made, and the directories on the way."""
    return (path in runner.sent or path in runner.dirs or _made_at_or_above(runner, path)
            or any(under(path, p) for p in SCRATCH))


def _made_at_or_above(runner, path: str) -> bool:
    while path not in ("/", ""):
        if path in runner.made:
            return True
        path = os.path.dirname(path)
    return False


def plan_files(task: TaskSpec, crank_files: Sequence[str]) -> List[tree.Entry]:
    """What the task must find at its paths, entry by entry (staging/tree.py)."""
    paths = [i.path for i in task.inputs if not i.url]
    paths += [o.path for o in task.outputs if o.update and os.path.lexists(o.path)]
    paths += [p for p in (*task.sources, *crank_files) if os.path.lexists(p)]
    return tree.plan(paths).entries


def identity(entry: tree.Entry):
    """What a file or link was on the client: sent again when it changes."""
    if entry.kind == tree.LINK:
        return ("link", entry.link)
    st = entry.st
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode)


def _parents(paths: Sequence[str]) -> set:
    found = set()
    for path in paths:
        path = os.path.dirname(path)
        while path not in found and path != "/":
            found.add(path)
            path = os.path.dirname(path)
    return found
