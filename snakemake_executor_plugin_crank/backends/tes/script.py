"""The POSIX sh script a TES task runs (``layout.WRAPPER``).

Before the command it makes the inputs what they are on the client (``staging.tree``): the
server has fetched each file to its own path; the script makes the directories (empty ones
too) and the symlinks, with their target text, then gives files, links and directories the
client's permission bits and modification times (nanoseconds where ``touch`` takes them, as
coreutils' does; whole seconds with busybox's; the times are left as they are, with one line
on stderr, in an image whose ``touch`` cannot set one). Directories get theirs last, once
nothing more is made in them. The workflow's sources (``TaskSpec.sources``) come as one
archive input, unpacked under ``layout.SOURCES``; each path that nothing else put there (a
declared input wins) is linked to its file, never at a product's path (a product stays
writable). An image without tar runs without them, saying so.

After the command, every product that exists is copied to ``/crank/out/p<NNNNNN>`` (after a
failed command only the rule's log files: nothing else of a failed job is used), with an
index of what was there and the command's exit code. The index carries what an object cannot:
each directory (empty ones included), each file's and directory's mode, and each symlink (the
product itself or one inside it), which goes up as a file holding its target text. A symlink
whose target the job made inside the workdir brings that target along (``q<NNNNNN>``, also a
link's target that is a link itself, up to a few): the index names which link it belongs to,
and the host decides whether and where it is installed (``results``). What crank put in place
(``layout.PLACED``: each entry that is not inside a directory it made whole, each such
directory, and the directories on the way) is never the job's. A link to something the job
made outside the workdir is noted for a warning. The script exits 0, because Funnel uploads no
output of a task whose executor failed: the exit code travels in ``/crank/out/exit``.

An output with a ``url`` (an object the server writes itself) is copied instead to
``/crank/put/p<NNNNNN>/<its name>``, only after a command that succeeded.

Pure functions: no I/O.
"""

from __future__ import annotations

import posixpath
import shlex
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Set

from ...staging.staged import Staged
from ...task import FILE_LAUNCHER, TaskSpec
from .. import cgroup
from ..paths import under
from .layout import (
    COMMAND, EXIT, INDEX, OUT, PLACED, SOURCES, USAGE, log_names, product_name, upload_dir,
    url_parent,
)

q = shlex.quote
# bytes of arguments in one command line: far below any kernel's limit
ARGS_MAX = 32 * 1024
# a link's target that is itself a link the job made is brought along this many times
HOPS = 8
TIME_PROBE = f"{OUT}/.crank-t"

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

# The lexical normal form of the absolute path $1 ('..' drops a name: in the task every
# directory on the way to a link the job made is a directory, so the kernel goes the same way).
NORM = """crank_norm() {
  crank_r=; crank_s=${1#/}
  while [ -n "$crank_s" ]; do
    case $crank_s in */*) crank_c=${crank_s%%/*}; crank_s=${crank_s#*/};; *) crank_c=$crank_s; crank_s=;; esac
    case $crank_c in ''|.) ;; ..) crank_r=${crank_r%/*};; *) crank_r=$crank_r/$crank_c;; esac
  done
  printf '%s\\n' "${crank_r:-/}"
}"""

# $1 was put in place by crank (it is, or lies in a directory crank made whole, or is the
# link to a workflow source): not the job's. Where grep fails, everything counts as crank's:
# nothing is sent.
PLACED_TEST = f"""crank_placed() {{
  if [ -L "$1" ]; then case $(readlink "$1") in {SOURCES}/*) return 0;; esac; fi
  grep -Fxq -- "= $1" {PLACED} 2>/dev/null; [ $? -ne 1 ] && return 0
  crank_a=$1
  while crank_a=${{crank_a%/*}}; [ -n "$crank_a" ]; do
    grep -Fxq -- "d $crank_a" {PLACED} 2>/dev/null; [ $? -ne 1 ] && return 0
  done
  return 1
}}"""


def _time(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _batched(command: str, paths: Iterable[str], tail: str = "") -> List[str]:
    """``command`` on every path, in as few lines as keep each below ARGS_MAX."""
    lines: List[str] = []
    chunk: List[str] = []
    size = 0
    for path in paths:
        quoted = q(path)
        if chunk and size + len(quoted) > ARGS_MAX:
            lines.append(f"{command} {' '.join(chunk)}{tail}")
            chunk, size = [], 0
        chunk.append(quoted)
        size += len(quoted) + 1
    if chunk:
        lines.append(f"{command} {' '.join(chunk)}{tail}")
    return lines


def _grouped(command: str, pairs: Iterable[tuple], tail: str) -> List[str]:
    """``command <key>`` on the paths of each key of (key, path) pairs, keys in order."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for key, path in pairs:
        groups[key].append(path)
    return [line for key in sorted(groups) for line in _batched(f"{command} {key}", groups[key], tail)]


def _writable(path: str, volumes: Sequence[str]) -> bool:
    return any(under(path, posixpath.normpath(v)) for v in volumes) or under(path, "/tmp")


def placed_list(task: TaskSpec, staged: Sequence[Staged]) -> str:
    """The content of ``layout.PLACED``: ``= <path>`` for what crank put in place, each entry
    not inside a directory it made whole (their content is crank's as a whole: ``d <path>``),
    the directories on the way and those of the products. Not the sources (the script tells
    them by their links, so the task does not grow with a checkout's files), nor paths with a
    line break: the host refuses whatever either would let pass."""
    dirs = {s.path for s in staged if s.directory and not s.ancestor}
    exact: Set[str] = {task.workdir}
    for s in staged:
        if posixpath.dirname(s.path) not in dirs:
            exact.add(s.path)
    for p in [*(p.path for p in task.products), task.workdir]:
        d = posixpath.dirname(p)
        while d != "/" and d not in exact:
            exact.add(d)
            d = posixpath.dirname(d)
    tops = {d for d in dirs if posixpath.dirname(d) not in dirs}
    lines = [f"= {p}" for p in sorted(exact)] + [f"d {p}" for p in sorted(tops)]
    return "".join(f"{line}\n" for line in lines if "\n" not in line)


def _setup(task: TaskSpec, staged: Sequence[Staged]) -> List[str]:
    """Lines that make the inputs what they are on the client (before the sources)."""
    lines: List[str] = []
    made = [s.path for s in staged if s.directory and not s.ancestor]
    parents = {posixpath.dirname(s.path) for s in staged if s.link}
    lines += _batched("mkdir -p", [task.workdir, *made, *sorted(parents - set(made))],
                      " || crank_fail 'cannot create a directory'")
    for s in staged:
        if s.link:
            lines.append(f"ln -s {q(s.link)} {q(s.path)} || crank_fail 'cannot make a symlink among the inputs'")
    return lines


def _metadata(staged: Sequence[Staged], volumes: Sequence[str]) -> List[str]:
    """Lines that give the inputs the client's modes and times: files and links first, then
    directories, once nothing more is made in them."""
    files = [s for s in staged if s.fetched and s.mode is not None]
    remote = [s.path for s in staged if s.fetched and s.mode is None]
    dirs = [s for s in staged if s.directory and not s.ancestor]
    # a directory on the way may lie outside every volume (read-only): best effort
    ancestors = [s for s in staged if s.ancestor and _writable(s.path, volumes)]
    lines = [
        f": > {TIME_PROBE} && if touch -h -d @1.5 {TIME_PROBE} 2>/dev/null; then crank_touch=ns; "
        f"elif touch -h -d @1 {TIME_PROBE} 2>/dev/null; then crank_touch=s; else crank_touch=; "
        "echo 'crank: the image has no touch that sets a time: the inputs keep the times of the task' >&2; fi; "
        f"rm -f {TIME_PROBE}",
        'crank_t() { crank_w=$1; shift; case $crank_touch in ns) touch -h -d "@$crank_w" "$@";; '
        's) touch -h -d "@${crank_w%.*}" "$@";; esac; }',
    ]
    lines += _grouped("chmod", ((f"{s.mode:o}", s.path) for s in files),
                      " || crank_fail 'an input is not at its path (see above): the TES server did not put it there'")
    # an object of another's carries no mode: the usual ones, as a local copy would have
    lines += _batched("chmod -R go-w", remote, " 2>/dev/null || :")
    lines += _grouped("crank_t", ((_time(s.mtime_ns), s.path) for s in staged
                                  if (s.fetched and s.mode is not None) or s.link), " 2>/dev/null || :")
    lines += _grouped("chmod", ((f"{s.mode:o}", s.path) for s in dirs),
                      " || crank_fail 'cannot give an input directory its mode'")
    lines += _grouped("chmod", ((f"{s.mode:o}", s.path) for s in ancestors), " 2>/dev/null || :")
    lines += _grouped("crank_t", ((_time(s.mtime_ns), s.path) for s in [*dirs, *ancestors]), " 2>/dev/null || :")
    return lines


def source_lines(task: TaskSpec, digest: str) -> List[str]:
    """The script's lines that unpack the workflow's sources (the archive input named
    ``digest``) and link them into place."""
    products = "|".join(q(p.path) for p in task.products)
    return [
        "if command -v tar >/dev/null 2>&1; then",
        f"  mkdir -p {SOURCES} && tar -xf /crank/in/{digest} -C {SOURCES} "
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


def _companions(task: TaskSpec, volumes: Sequence[str]) -> List[str]:
    """The functions that bring along what the links among the products lead to."""
    w = q(task.workdir)
    products = "|".join(f"{q(p.path)}|{q(p.path)}/*" for p in task.products)
    writable = "|".join(["/tmp/*", *(f"{q(posixpath.normpath(v))}/*" for v in volumes)])
    return [
        NORM,
        PLACED_TEST,
        # $1 outside the workdir: the job made it (it exists, in a writable place, not crank's)
        "crank_outside() {",
        '  [ -e "$1" ] || [ -L "$1" ] || return 1',
        f'  case $1 in /crank/*|{SOURCES}|{SOURCES}/*) return 1;; {writable}) ;; *) return 1;; esac',
        '  ! crank_placed "$1"',
        "}",
        # $1 the owner's name, $2 a link of it (its path here), $3 the link as the index names
        # it, $4 how many more links may follow
        "crank_chase() {",
        '  crank_d=$(readlink "$2") || return 0',
        '  case $crank_d in /*) ;; *) crank_d=${2%/*}/$crank_d;; esac',
        '  crank_d=$(crank_norm "$crank_d")',
        f'  case $crank_d in {w}/.snakemake|{w}/.snakemake/*) return 0;; {w}/*) ;; '
        f'*) if crank_outside "$crank_d"; then echo "w $1 $3" >> {INDEX}; fi; return 0;; esac',
        '  [ -e "$crank_d" ] || [ -L "$crank_d" ] || return 0',
        *([f'  case $crank_d in {products}) return 0;; esac'] if products else []),
        '  crank_placed "$crank_d" && return 0',
        "  crank_k=$((crank_k + 1)); crank_q=$(printf 'q%06d' \"$crank_k\")",
        f'  echo "c $1 $crank_q $3" >> {INDEX}',
        '  crank_collect "$crank_d" "$crank_q" || return 1',
        '  if [ -L "$crank_d" ] && [ "$4" -gt 0 ]; then crank_chase "$crank_q" "$crank_d" . $(($4 - 1)); fi',
        "}",
        # the links product $1 (at $2) is or holds
        "crank_links() {",
        f'  if [ -L "$2" ]; then crank_chase "$1" "$2" . {HOPS}',
        '  elif [ -d "$2" ]; then',
        f'    (cd "$2" && find . -type l) > {OUT}/.crank-links || return 1',
        f'    while IFS= read -r l; do crank_chase "$1" "$2/${{l#./}}" "$l" {HOPS} || return 1; done < {OUT}/.crank-links',
        f"    rm -f {OUT}/.crank-links",
        "  fi",
        "}",
        "crank_k=0",
    ]


# What the container's cgroup counted, read right after the command, before the products
# are collected (cgroup.py)
USAGE_LINES = cgroup.FUNCTION + '; crank_usage="$(echo ' + cgroup.SEPARATOR + '; crank_cg)"'


def wrapper_script(task: TaskSpec, staged: Sequence[Staged], volumes: Sequence[str],
                   sources: str = "") -> str:
    """The script the executor runs; ``volumes``: the task's writable volumes."""
    lines = [
        "# crank: make the user's paths, run the command, collect the products",
        "set -u",
        "crank_fail() { echo \"crank: $*\" >&2; exit 70; }",
        COLLECT,
        *_companions(task, volumes),
        *_setup(task, staged),
    ]
    lines += _batched("mkdir -p", sorted({posixpath.dirname(p.path) for p in task.products}),
                      " || crank_fail 'cannot create a directory'")
    lines += _batched("mkdir -p", [upload_dir(n) for n, p in enumerate(task.products) if p.url],
                      " || crank_fail 'cannot create a directory'")
    if sources:  # after the inputs: a declared input wins
        lines += source_lines(task, sources)
    lines += _metadata(staged, volumes)
    lines.append(f"cd {q(task.workdir)} || crank_fail 'cannot enter the workdir'")
    # the same launcher as on Docker, reading the command from a file (no argv limit)
    lines.append(f"/bin/sh -c {q(FILE_LAUNCHER)} crank {COMMAND}")
    lines.append("crank_code=$?")
    lines.append(USAGE_LINES)
    lines.append(f"cd {OUT} || crank_fail 'no {OUT}'")
    lines.append(f"printf '%s\\n' \"$crank_usage\" > {USAGE}")
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
    # what the products' links lead to, once every product is collected
    chased = [f"crank_links {product_name(n)} {q(p.path)} || crank_fail 'cannot collect the target of a link of {n}'"
              for n, p in enumerate(task.products) if not p.url]
    if chased:
        lines.append('if [ "$crank_code" = 0 ]; then')
        lines += [f"  {line}" for line in chased]
        lines.append("fi")
    lines.append(f"echo \"$crank_code\" > {EXIT}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"
