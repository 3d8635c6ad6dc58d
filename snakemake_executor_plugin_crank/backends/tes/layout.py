"""Where a task's files sit inside a TES container, and the script that sets them up.

Funnel (v0.11.12) compares mount paths as plain string prefixes and silently drops a mount
whose path starts with another's (``/w/a.txt`` hides ``/w/a.txt.gz``, ``/w/out`` hides
``/w/outdir``, its own ``/tmp`` hides ``/tmpx``), and runs containers with a read-only root
file system. So crank never mounts anything at the user's paths:

- every input file is a TES input at ``/crank/in/<64 hex>`` (its sha256, or the sha256 of its
  URL when it already is remote): all the same length, so none prefixes another;
- the user's paths are made by the task's script as symlinks to those (directories as real
  directories of symlinked files), in writable TES ``volumes``: the workdir and the directories
  of inputs and outputs, chosen so that no volume path is a string prefix of another;
- an ``update()`` output that exists is staged like an input and *copied* to its path (the
  command changes it in place; a link would point into a read-only input mount);
- after the command, every product that exists is copied to ``/crank/out/p<NNNNNN>`` (after a
  failed command only the rule's log files: nothing else of a failed job is used), with an
  index of what was there and the command's exit code; ``/crank/out`` is the task's one
  DIRECTORY output. The script then exits 0, because Funnel uploads no output of a task whose
  executor failed: the exit code travels in ``/crank/out/exit``.

Pure functions: no I/O, no TES client.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from ...errors import CrankError
from ...task import FILE_LAUNCHER, Kind, TaskSpec
from ..paths import under

ROOT = "/crank"
IN = "/crank/in"
OUT = "/crank/out"
WRAPPER = "/crank/in/run.sh"
COMMAND = "/crank/in/cmd.sh"
STDOUT = "/crank/out/stdout"
STDERR = "/crank/out/stderr"
EXIT = "exit"
INDEX = "index"
# Funnel mounts these itself (writable); a volume path that string-extends them is escaped
RESERVED = ("/tmp", ROOT)
UNSAFE = re.compile(r"[\s:,\"'\\]")


def product_name(n: int) -> str:
    return f"p{n:06d}"


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass(frozen=True)
class Link:
    """A user path (``path``) that the script makes as a symlink to ``target``."""

    path: str
    target: str


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


@dataclass(frozen=True)
class Staged:
    """One file the container reads: the user's path, and where it comes from."""

    path: str  # the user's path (a file; or a directory when ``directory``)
    url: str
    digest: str  # names its container path
    directory: bool = False  # a remote directory passed as one TES DIRECTORY input
    writable: bool = False  # the old content of an update() output: copied, not linked
    link: str = ""  # not a TES input: the script makes ``path`` a symlink to this (see staging)


def container_path(staged: Staged) -> str:
    return f"{IN}/{staged.digest}"


def log_names(task: TaskSpec) -> Set[str]:
    """Product names of the rule's log files (the products a failed job brings back)."""
    first = len(task.outputs)
    return {product_name(n) for n in range(first, first + len(task.logs))}


def wrapper_script(task: TaskSpec, staged: Sequence[Staged], local_dirs: Sequence[str]) -> str:
    """The POSIX sh script the executor runs (from ``WRAPPER``)."""
    q = shlex.quote
    lines = [
        "# crank: make the user's paths, run the command, collect the products",
        "set -u",
        "crank_fail() { echo \"crank: $*\" >&2; exit 70; }",
    ]
    made: Set[str] = set()

    def mkdir(d: str) -> None:
        if d not in made:
            made.add(d)
            lines.append(f"mkdir -p {q(d)} || crank_fail 'cannot create a directory'")

    mkdir(task.workdir)
    for d in local_dirs:
        mkdir(d)
    for product in task.products:
        mkdir(posixpath.dirname(product.path))
    for s in staged:
        mkdir(posixpath.dirname(s.path))
        if s.writable and not s.link:
            lines.append(f"cp {container_path(s)} {q(s.path)} || crank_fail 'cannot copy an update() output'")
            continue
        target = q(s.link) if s.link else container_path(s)
        lines.append(f"ln -sfn {target} {q(s.path)} || crank_fail 'cannot link an input'")
    lines.append(f"cd {q(task.workdir)} || crank_fail 'cannot enter the workdir'")
    # the same launcher as on Docker, reading the command from a file (no argv limit)
    lines.append(f"/bin/sh -c {q(FILE_LAUNCHER)} crank {COMMAND}")
    lines.append("crank_code=$?")
    lines.append(f"cd {OUT} || crank_fail 'no {OUT}'")
    lines.append(f": > {INDEX}")
    logs = log_names(task)
    for n, product in enumerate(task.products):
        name, p = product_name(n), q(product.path)
        # a failed job's logs come back; its other products would be removed anyway
        wanted = "" if name in logs else "[ \"$crank_code\" = 0 ] && "
        lines.append(
            f"if {wanted}[ -d {p} ]; then cp -RL {p} {name} && echo 'd {name}' >> {INDEX} && "
            f"(cd {name} && find . -type d) | sed 's|^|s {name} |' >> {INDEX} || crank_fail 'cannot collect {n}'; "
            f"elif {wanted}[ -e {p} ]; then cp -L {p} {name} && echo 'f {name}' >> {INDEX} || crank_fail 'cannot collect {n}'; fi"
        )
    lines.append(f"echo \"$crank_code\" > {EXIT}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def read_index(text: str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """(product name -> 'f'|'d', product name -> its subdirectories) from an index file.
    The task wrote it, so a subdirectory that would lead outside its product is refused."""
    kinds: Dict[str, str] = {}
    subdirs: Dict[str, List[str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("f", "d"):
            kinds[rest.strip()] = kind
        elif kind == "s":
            name, _, sub = rest.partition(" ")
            sub = posixpath.normpath(sub)
            if sub.startswith(("/", "../")) or sub == "..":
                raise CrankError(f"the task's index names a directory outside its output: {sub!r}")
            subdirs.setdefault(name, []).append(sub)
    return kinds, subdirs


def input_dirs(task: TaskSpec) -> List[str]:
    """Local directory inputs: the script makes them as real directories."""
    return [i.path for i in task.inputs if i.kind is Kind.DIRECTORY and not i.url]


def needed_dirs(task: TaskSpec, staged: Sequence[Staged]) -> List[str]:
    dirs = {task.workdir}
    dirs |= {posixpath.dirname(s.path) for s in staged}
    dirs |= {posixpath.dirname(p.path) for p in task.products}
    dirs |= {posixpath.dirname(d) for d in input_dirs(task)}
    return sorted(dirs)
