"""Adopting what a dead run left: the key that says a task does the work a new job asks
for, and the pool of a dead run's tasks that jobs of this run may claim.

A task's key is a digest of everything that decides what it produces: its label (rule or
group), image, command, environment, resources, the paths of its inputs and products, the
workflow's source files it depends on, and the inputs' content as the backend identifies it (``identify``:
content digests on TES; on Docker what a rewrite cannot keep equal: size, times, inode). A link
counts by its text and by what it points to, so that new content behind an unchanged link is new
work. A FIFO, socket or device counts by its kind only: it is never opened (opening a FIFO
blocks until someone writes to it). Run-specific parts (job id,
attempt, task name, log directory) are left out: a rerun numbers its jobs anew.

Imports nothing of crank's but ``task``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Generic, Iterable, List, Optional, Tuple, TypeVar

from ..task import Adopted, Input, Launch, TaskSpec

# file path -> what identifies its content
Identify = Callable[[str], str]


def stat_identity(path: str) -> str:
    """What a rewrite of the file cannot keep equal (Docker: the task reads the file itself,
    in place): ``cp -p`` keeps size and mtime but not the ctime, an editor's save-by-rename not
    the inode."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def key_of(task: TaskSpec, identify: Identify, store: str = "") -> str:
    """The task's adoption key (see the module text); ``store``: where the task leaves its
    products for the client to fetch (TES), so that a rerun with another storage prefix does
    not take a task whose results it would look for elsewhere."""
    r = task.resources
    work = {
        "store": store,
        "label": task.label,
        "image": task.image,
        "script": task.script,
        "workdir": task.workdir,
        "env": sorted(task.env.items()),
        "inputs": [[i.path, i.kind.value, i.url] for i in task.inputs],
        "outputs": [[o.path, o.kind.value, o.update, o.url] for o in task.outputs],
        "logs": [o.path for o in task.logs],
        "benchmarks": list(task.benchmarks),
        "resources": [r.cpus, r.mem_mb, r.disk_mb, r.runtime_s, r.gpus, r.preemptible, r.gpu_model],
        "sources": _sources_identity(_sources_read(task)),
        "content": [_content(i, identify) for i in task.inputs if not i.url]
        + [_tree(o.path, identify) for o in task.outputs if o.update and os.path.lexists(o.path)],
    }
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()


def _content(i: Input, identify: Identify):
    if not os.path.lexists(i.path):
        return [i.path, None]
    return _tree(i.path, identify)


def _tree(path: str, identify: Identify) -> List:
    """What a file or directory holds: for a directory, every entry below it (see the module
    text for links and special files)."""
    if os.path.islink(path) and not os.path.isdir(path):
        return [path, "link", os.readlink(path), _file(path, identify)]
    if not os.path.isdir(path):
        return [path, _file(path, identify)]
    entries: List = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            entry: List = [os.path.relpath(full, path)]
            if os.path.islink(full):
                entry += ["link", os.readlink(full)]
            entries.append(entry + [_file(full, identify)])
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        if not dirs and not files:
            entries.append([os.path.relpath(root, path), "dir"])
    return [path, "tree", entries]


def _file(path: str, identify: Identify) -> Optional[str]:
    """What the file at ``path`` (links followed) holds: its identity when it is a regular
    file, else its kind (a directory a link points to counts by its link text alone, as the
    walk does not enter it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # a dangling link
    if stat.S_ISREG(mode):
        return identify(path)
    return "dir" if stat.S_ISDIR(mode) else f"special:{stat.S_IFMT(mode):o}"


def _sources_read(task: TaskSpec) -> Tuple[str, ...]:
    """The sources the task's work depends on: all of them for a task that runs Snakemake
    (a run: block, a script); for a command run directly, those it names (an edit
    elsewhere in the workflow does not change what it does)."""
    if task.launch is not Launch.DIRECT:
        return task.sources
    return tuple(
        path for path, relative in _names(task.sources, task.workdir)
        if relative in task.script or path in task.script
    )


@functools.lru_cache(maxsize=8)
def _names(sources: Tuple[str, ...], workdir: str) -> Tuple[Tuple[str, str], ...]:
    """Each source with its path relative to the workdir (the same for every task of a
    run: computed once)."""
    return tuple((p, os.path.relpath(p, workdir)) for p in sources)


@functools.lru_cache(maxsize=64)
def _sources_identity(sources: Tuple[str, ...]) -> str:
    """The workflow's sources, by size and modification time (the same for every task of a
    run: computed once)."""
    h = hashlib.sha256()
    for path in sources:
        try:
            h.update(f"{path}\0{stat_identity(path)}\0".encode())
        except OSError:
            h.update(f"{path}\0-\0".encode())
    return h.hexdigest()


T = TypeVar("T")


@dataclass(frozen=True)
class Orphan(Generic[T]):
    """A dead run's task: its key, which files it writes (``products_id``), and what the
    backend needs to take it over (``ref``)."""

    key: str
    products: str
    ref: T
    finished: bool = False
    started: Optional[float] = None  # wall clock, when it began running, if it did

    def adopted(self, handle: str) -> Adopted:
        ran = None if self.started is None else max(0.0, time.time() - self.started)
        return Adopted(handle, ran)


class Orphans(Generic[T]):
    """The tasks dead runs left that no job of this run has claimed yet; thread-safe."""

    def __init__(self, found: Iterable[Orphan[T]] = ()):
        self._lock = threading.Lock()
        self._by_key: Dict[str, List[Orphan[T]]] = {}
        for orphan in found:
            self._by_key.setdefault(orphan.key, []).append(orphan)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_key.values())

    def claim(self, key: str) -> Optional[Orphan[T]]:
        """The orphan doing exactly this work (a running one before a finished one), taken
        out of the pool; None when there is none."""
        with self._lock:
            candidates = self._by_key.get(key)
            if not candidates:
                return None
            candidates.sort(key=lambda o: o.finished)
            orphan = candidates.pop(0)
            if not candidates:
                del self._by_key[key]
            return orphan

    def writing(self, products: str) -> List[Orphan[T]]:
        """The orphans that write the same files (``products_id``) as other work: they
        must not go on. Taken out of the pool."""
        taken = []
        with self._lock:
            for key in list(self._by_key):
                keep = []
                for orphan in self._by_key[key]:
                    (taken if orphan.products == products else keep).append(orphan)
                if keep:
                    self._by_key[key] = keep
                else:
                    del self._by_key[key]
        return taken

    def take_all(self) -> List[Orphan[T]]:
        with self._lock:
            everything = [o for v in self._by_key.values() for o in v]
            self._by_key.clear()
        return everything


class Adoption(Generic[T]):
    """What dead runs left (``orphans``, as ``gather_orphans`` found it) and the three things
    every backend does with it, over what its ``source`` (the backend) knows of its own
    tasks: ``orphan_key(task)``, the key of the work a task asks for; ``take_orphan(orphan,
    task)``, the handle of the orphan now followed by this run; ``drop_orphans(orphans,
    quietly)``, canceled (``quietly``: an error is left for the run's end and the next start),
    and how many were still active."""

    def __init__(self, source):
        self.source = source
        self.orphans: Orphans[T] = Orphans()

    def __len__(self) -> int:
        return len(self.orphans)

    def adopt(self, task: TaskSpec) -> Optional[Adopted]:
        """A kept task doing ``task``'s work, now this run's; else None, after stopping the
        kept tasks that write the same files."""
        if not self.orphans:
            return None
        orphan = self.orphans.claim(self.source.orphan_key(task))
        if orphan is None:
            self.stop_other_versions(task)
            return None
        return orphan.adopted(self.source.take_orphan(orphan, task))

    def stop_other_versions(self, task: TaskSpec) -> None:
        """The kept tasks that write ``task``'s files do other work: they must not go on."""
        if self.orphans:
            self.source.drop_orphans(self.orphans.writing(products_id(task)), quietly=True)

    def cancel_rest(self) -> int:
        """Cancel what no job adopted; how many were still active."""
        return self.source.drop_orphans(self.orphans.take_all(), quietly=False)


def products_id(task: TaskSpec) -> str:
    """Which files the task writes, short enough for a tag or a label."""
    paths = sorted(p.path for p in task.products)
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:32]

