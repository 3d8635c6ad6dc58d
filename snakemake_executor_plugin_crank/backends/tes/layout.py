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
  index of what was there and the command's exit code. The server uploads plain files only, so
  the index also carries what an object cannot: each directory (empty ones included), each
  file's and directory's mode, and each symlink (the product itself or one inside it), which
  goes up as a file holding its target text; ``/crank/out`` is a DIRECTORY
  output of the task. The script then exits 0, because Funnel uploads no output of a task whose
  executor failed: the exit code travels in ``/crank/out/exit``;
- an output with a ``url`` (an object the server writes itself) is copied instead to
  ``/crank/put/p<NNNNNN>/<its name>``, only after a command that succeeded: that directory
  is a DIRECTORY output to the object's parent URL, so the server uploads it straight to
  the object, and uploads nothing (no error: a missing FILE output would be one) when the
  job failed or did not make it.

The workflow's sources (``TaskSpec.sources``) come as one archive input (``sources``), the
same for every task of a run, unpacked under ``/tmp/.crank-sources``; the script links each
path that nothing else put there (a declared input wins) to its file, never at a product's
path (a product stays writable). An image without tar runs without them, saying so.

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
PUT = "/crank/put"
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


SOURCES = "/tmp/.crank-sources"


def source_lines(task: TaskSpec, digest: str) -> List[str]:
    """The script's lines that unpack the workflow's sources (the archive input named
    ``digest``) and link them into place."""
    q = shlex.quote
    products = "|".join(q(p.path) for p in task.products)
    return [
        "if command -v tar >/dev/null 2>&1; then",
        f"  mkdir -p {SOURCES} && tar -xf {IN}/{digest} -C {SOURCES} "
        "|| crank_fail 'cannot unpack the workflow sources'",
        "  while IFS= read -r crank_line; do",
        '    crank_n=${crank_line%% *}; crank_p=${crank_line#* }',
        *([f'    case "$crank_p" in {products}) continue;; esac'] if products else []),
        '    if [ ! -e "$crank_p" ] && [ ! -L "$crank_p" ]; then',
        '      { [ -d "${crank_p%/*}" ] || mkdir -p "${crank_p%/*}"; } && '
        f'ln -s {SOURCES}/"$crank_n" "$crank_p" || crank_fail \'cannot link a workflow source\'',
        "    fi",
        f"  done < {SOURCES}/manifest",
        "else echo 'crank: the image has no tar: the workflow sources are not in place' >&2; fi",
    ]


def source_dirs(task: TaskSpec) -> List[str]:
    """Directories of sources outside the workdir: the script makes links there."""
    return sorted({posixpath.dirname(p) for p in task.sources if not under(p, task.workdir)})


def upload_dir(n: int) -> str:
    return f"{PUT}/{product_name(n)}"


def url_parent(url: str) -> Tuple[str, str]:
    """(the URL of an object's parent, the object's name)."""
    parent, _, name = url.rpartition("/")
    return parent, name


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


# Copies product $1 to $2 (in OUT) and writes its index lines. A symlink, the product itself
# or one inside it, goes up as a file holding its target text (the server would follow it, or
# fail on a dangling one). Modes are read where stat(1) exists (busybox and coreutils have it):
# without it a product still comes back, with the usual modes.
COLLECT = f"""crank_collect() {{
  if [ -L "$1" ]; then t=$(readlink "$1") && printf '%s' "$t" > "$2" && echo "l $2 ." >> {INDEX}
  elif [ -d "$1" ]; then
    cp -RP "$1" "$2" && echo "d $2" >> {INDEX} && (cd "$2" && find . -type d) | sed "s|^|s $2 |" >> {INDEX} || return 1
    (cd "$1" && find . ! -type l -exec stat -c "m $2 %a %n" {{}} + >> {OUT}/{INDEX}) 2>/dev/null
    (cd "$2" && find . -type l) | while IFS= read -r l; do
      t=$(readlink "$2/$l") && rm "$2/$l" && printf '%s' "$t" > "$2/$l" && echo "l $2 $l" >> {INDEX} || exit 1
    done
  elif [ -e "$1" ]; then
    cp "$1" "$2" && echo "f $2" >> {INDEX} && {{ stat -c "m $2 %a ." "$1" >> {INDEX} 2>/dev/null; true; }}
  fi
}}"""


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
    empty_dir: bool = False  # not a TES input: the script makes ``path`` an empty directory
    mode: int = 0  # a local file's permission bits: an executable one is copied with them

    @property
    def fetched(self) -> bool:
        """The server fetches it into ``container_path``; else the script makes it."""
        return not (self.link or self.empty_dir)


def container_path(staged: Staged) -> str:
    return f"{IN}/{staged.digest}"


def log_names(task: TaskSpec) -> Set[str]:
    """Product names of the rule's log files (the products a failed job brings back)."""
    first = len(task.outputs)
    return {product_name(n) for n in range(first, first + len(task.logs))}


def wrapper_script(task: TaskSpec, staged: Sequence[Staged], local_dirs: Sequence[str],
                   sources: str = "") -> str:
    """The POSIX sh script the executor runs (from ``WRAPPER``)."""
    q = shlex.quote
    lines = [
        "# crank: make the user's paths, run the command, collect the products",
        "set -u",
        "crank_fail() { echo \"crank: $*\" >&2; exit 70; }",
        COLLECT,
    ]
    made: Set[str] = set()

    def mkdir(d: str) -> None:
        if d not in made:
            made.add(d)
            lines.append(f"mkdir -p {q(d)} || crank_fail 'cannot create a directory'")

    mkdir(task.workdir)
    links = {s.path for s in staged if s.link}
    for d in local_dirs:
        if d not in links:  # a symlink to a directory stays one
            mkdir(d)
    for n, product in enumerate(task.products):
        mkdir(posixpath.dirname(product.path))
        if product.url:
            mkdir(upload_dir(n))
    for s in staged:
        mkdir(posixpath.dirname(s.path))
        if s.empty_dir:
            mkdir(s.path)
            continue
        if (s.writable or s.mode & 0o111) and not s.link:
            # a link into the read-only input mount could be neither changed nor executed
            chmod = f" && chmod {s.mode:o} {q(s.path)}" if s.mode else ""
            lines.append(f"cp {container_path(s)} {q(s.path)}{chmod} || crank_fail 'cannot copy an input'")
            continue
        target = q(s.link) if s.link else container_path(s)
        lines.append(f"ln -sfn {target} {q(s.path)} || crank_fail 'cannot link an input'")
    if sources:  # after the inputs: a declared input wins
        lines += source_lines(task, sources)
    lines.append(f"cd {q(task.workdir)} || crank_fail 'cannot enter the workdir'")
    # the same launcher as on Docker, reading the command from a file (no argv limit)
    lines.append(f"/bin/sh -c {q(FILE_LAUNCHER)} crank {COMMAND}")
    lines.append("crank_code=$?")
    lines.append(f"cd {OUT} || crank_fail 'no {OUT}'")
    lines.append(f": > {INDEX}")
    logs = log_names(task)
    for n, product in enumerate(task.products):
        name, p = product_name(n), q(product.path)
        if product.url:
            # the server uploads it to its object: only what a job that succeeded made
            put = q(f"{upload_dir(n)}/{url_parent(product.url)[1]}")
            lines.append(
                f"if [ \"$crank_code\" = 0 ] && [ -f {p} ]; then cp -L {p} {put} || crank_fail 'cannot collect {n}'; fi"
            )
            continue
        # a failed job's logs come back; its other products would be removed anyway
        collect = f"crank_collect {p} {name} || crank_fail 'cannot collect {n}'"
        lines.append(collect if name in logs else f"if [ \"$crank_code\" = 0 ]; then {collect}; fi")
    lines.append(f"echo \"$crank_code\" > {EXIT}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


@dataclass
class Index:
    """What a task's index file says of its products, by product name."""

    kinds: Dict[str, str]  # 'f' a file, 'd' a directory, 'l' a symlink
    subdirs: Dict[str, List[str]]  # every directory in a directory product ('.' itself)
    links: Dict[str, List[str]]  # symlinks in a directory product; their files hold the target
    modes: Dict[str, Dict[str, int]]  # permission bits of each file and directory ('.' itself)


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
    return index


def _inside(sub: str) -> str:
    sub = posixpath.normpath(sub)
    if sub.startswith(("/", "../")) or sub == "..":
        raise CrankError(f"the task's index names a path outside its output: {sub!r}")
    return sub


def input_dirs(task: TaskSpec) -> List[str]:
    """Local directory inputs: the script makes them as real directories."""
    return [i.path for i in task.inputs if i.kind is Kind.DIRECTORY and not i.url]


def needed_dirs(task: TaskSpec, staged: Sequence[Staged]) -> List[str]:
    dirs = {task.workdir}
    dirs |= {posixpath.dirname(s.path) for s in staged}
    dirs |= {posixpath.dirname(p.path) for p in task.products}
    dirs |= {posixpath.dirname(d) for d in input_dirs(task)}
    return sorted(dirs)
