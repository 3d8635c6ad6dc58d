"""Where a task's files sit inside a TES container, and what its index of products says.

Funnel (v0.11.12) compares mount paths as plain string prefixes and silently drops a mount
whose path starts with another's (``/w/a.txt`` hides ``/w/a.txt.gz``, ``/w/out`` hides
``/w/outdir``, its own ``/tmp`` hides ``/tmpx``), and runs containers with a read-only root
file system. So crank mounts nothing at the user's paths; it asks for writable TES
``volumes`` (the workdir and the directories of inputs and outputs, chosen so that no volume
path is a string prefix of another) and has the server fetch each input file straight to its
own path inside them: an input is never a mount, so no prefix can hide it (Funnel downloads an
input to its path in the task's directory on the host, which is where the volume holding that
path is mounted from). The script (``script``) then makes the rest as the client has it:
directories, symlinks, modes and times.

crank's own files use fixed-length paths under ``/crank``: the script and the command in
``/crank/in``, the products in ``/crank/out`` (a DIRECTORY output), each ``p<NNNNNN>`` with an
index of what they are (the server uploads plain files only); an output with a ``url`` (an
object the server writes itself) goes to ``/crank/put/p<NNNNNN>/<its name>``, a DIRECTORY output
to the object's parent URL.

Pure functions: no I/O, no TES client.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from ...errors import CrankError
from ...staging.staged import Staged
from ...task import TaskSpec
from ..paths import under

ROOT = "/crank"
IN = "/crank/in"
OUT = "/crank/out"
PUT = "/crank/put"
WRAPPER = "/crank/in/run.sh"
COMMAND = "/crank/in/cmd.sh"
STDOUT = "/crank/out/stdout"
STDERR = "/crank/out/stderr"
EXIT = "exit"
# what the container's cgroup says it used (script.USAGE_LINES), beside the exit code
USAGE = "usage"
INDEX = "index"
# Funnel mounts these itself (writable); a volume path that string-extends them is escaped
RESERVED = ("/tmp", ROOT)
UNSAFE = re.compile(r"[\s:,\"'\\]")


def product_name(n: int) -> str:
    return f"p{n:06d}"


SOURCES = "/tmp/.crank-sources"
# what crank put in place, for the script to tell from what the job made (``script``)
PLACED = "/crank/in/placed"


def source_dirs(task: TaskSpec) -> List[str]:
    """Directories of sources outside the workdir: the script makes links there."""
    return sorted({posixpath.dirname(p) for p in task.sources if not under(p, task.workdir)})


def upload_dir(n: int) -> str:
    return f"{PUT}/{product_name(n)}"


def url_parent(url: str) -> Tuple[str, str]:
    """(the URL of an object's parent, the object's name)."""
    parent, _, name = url.rpartition("/")
    return parent, name


def _common(a: str, b: str) -> str:
    return posixpath.commonpath([a, b])


def volumes(dirs: Iterable[str]) -> List[str]:
    """Writable directories that cover ``dirs`` (each one is under one of them), written so
    that none is a string prefix of another or of a RESERVED path, nor extends one without
    being below it. Two such paths are merged into their common directory; when that is ``/``
    (``/tmp`` and ``/tmpx``) the later is written with a leading ``//``: the same directory
    for the container engine, another string for Funnel's prefix test."""

    def minimal(paths: Set[str]) -> Set[str]:
        return {p for p in paths if not any(q != p and under(p, q) for q in paths)}

    wanted: Set[str] = set()
    for d in dirs:
        d = posixpath.normpath(d)
        if under(d, ROOT):
            raise CrankError(f"{d}: paths under {ROOT} are reserved for crank on TES")
        # Funnel splits its docker command line on white space, and ':' ',' '"' end a
        # volume spec: mount the deepest directory above that has none of them
        safe = d
        while UNSAFE.search(safe):
            safe = posixpath.dirname(safe)
        if safe == "/":
            raise CrankError(
                f"{d}: a TES server like Funnel cannot mount a directory whose top-level name "
                "holds white space, ':', ',' or quotes; move the workflow or its files"
            )
        wanted.add(safe)
    current = minimal(wanted)
    escaped: Dict[str, int] = {}
    while True:
        shown = {p: "/" * escaped.get(p, 0) + p for p in current}
        pair = next(
            ((p, q) for p in current for q in current
             if p != q and shown[q].startswith(shown[p]) and not under(q, p)),
            None,
        )
        if pair is not None:
            p, q = pair
            common = _common(p, q)
            if common != "/":
                current = minimal((current - {p, q}) | {common})
            else:
                escaped[q] = escaped.get(q, 0) + 1
            continue
        clash = next(
            (p for p in current for r in RESERVED
             if (shown[p].startswith(r) and not under(p, r))
             or (r.startswith(shown[p]) and not under(r, p))),
            None,
        )
        if clash is None:
            return sorted(shown.values())
        escaped[clash] = escaped.get(clash, 0) + 1


def log_names(task: TaskSpec) -> Set[str]:
    """Product names of the rule's log files (the products a failed job brings back)."""
    first = len(task.outputs)
    return {product_name(n) for n in range(first, first + len(task.logs))}


@dataclass
class Index:
    """What a task's index file says of its products, by product name."""

    kinds: Dict[str, str]  # 'f' a file, 'd' a directory, 'l' a symlink
    subdirs: Dict[str, List[str]]  # every directory in a directory product ('.' itself)
    links: Dict[str, List[str]]  # symlinks in a directory product; their files hold the target
    modes: Dict[str, Dict[str, int]]  # permission bits of each file and directory ('.' itself)
    # (owner, name, link): ``name`` (q<N>) holds what the link ``link`` of ``owner`` (a product,
    # or another such name) leads to, which the job made in the workdir
    companions: List[Tuple[str, str, str]] = field(default_factory=list)
    # (owner, link): a link whose target the job made outside the workdir
    outside: List[Tuple[str, str]] = field(default_factory=list)


COMPANION = re.compile(r"q[0-9]{6}")
NAME = re.compile(r"[pq][0-9]{6}")


def read_index(text: str) -> Index:
    """An index file, of any crank version (lines of an unknown kind are skipped). The task
    wrote it, so a path that would lead outside its product is refused."""
    index = Index({}, {}, {}, {})
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("f", "d"):
            index.kinds[rest.strip()] = kind
        elif kind in ("s", "l"):
            name, _, sub = rest.partition(" ")
            sub = _inside(sub)
            if kind == "l" and sub == ".":
                index.kinds[name] = "l"
            else:
                (index.subdirs if kind == "s" else index.links).setdefault(name, []).append(sub)
        elif kind == "m":
            name, _, rest = rest.partition(" ")
            mode, _, sub = rest.partition(" ")
            try:
                index.modes.setdefault(name, {})[_inside(sub)] = int(mode, 8) & 0o7777
            except ValueError:
                raise CrankError(f"the task's index holds a mode that is not octal: {mode!r}") from None
        elif kind == "c":
            owner, _, rest = rest.partition(" ")
            name, _, sub = rest.partition(" ")
            if not (NAME.fullmatch(owner) and COMPANION.fullmatch(name)):
                raise CrankError(f"the task's index names an unknown product: {line[:80]!r}")
            index.companions.append((owner, name, _inside(sub)))
        elif kind == "w":
            owner, _, sub = rest.partition(" ")
            index.outside.append((owner, _inside(sub)))
    return index


def _inside(sub: str) -> str:
    sub = posixpath.normpath(sub)
    if sub.startswith(("/", "../")) or sub == "..":
        raise CrankError(f"the task's index names a path outside its output: {sub!r}")
    return sub


def needed_dirs(task: TaskSpec, staged: Sequence[Staged]) -> List[str]:
    """The directories the task writes in: where its inputs are fetched or made (a
    directory it makes itself; not the directories on the way to them), and where its
    products go."""
    dirs = {task.workdir}
    dirs |= {s.path if s.directory else posixpath.dirname(s.path) for s in staged if not s.ancestor}
    dirs |= {posixpath.dirname(p.path) for p in task.products}
    return sorted(dirs)
