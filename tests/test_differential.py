"""Differential test: small random workflows (Hypothesis draws the structure, the Snakefile is
generated as text) must leave byte for byte the same files, and the same exit status, under
crank (Docker, TES) as under Snakemake's local executor in an identical copy of the workdir.

The features are those users combine: shell rules writing files (text or not, executable or
not) and directories (with symlinks, empty directories), ``update()``, ``temp()``,
``protected()``, ``touch()``, ``directory()``, symlink outputs (to an input, or to a file or
directory the job made, declared or not, also from inside a directory output), ``log:`` files,
failing jobs, inputs outside the workdir and symlinks to them, names with spaces, quotes and
non-ASCII letters, groups, checkpoints, shadow rules of every depth, and a second run after an
edit (a source, an input outside the workdir, a file rewritten with its size and mtime kept,
the Snakefile's code, an output removed) or with ``-F`` / ``-R``. Jobs look at what they were
given (``LOOKS``): an archive of their inputs listed and extracted, copies with ``cp -a`` and
``cp -P``, counts of files and links, ``test -L`` and ``stat``, and the times of the sources
(which every copy of the workdir gets the same: fixed times), to the nanosecond with
coreutils' ``ls`` and ``stat`` in an image that has them. A difference fails with the shrunk
workflow's Snakefile, the steps and what differs.

Each workflow runs once under the local executor and once on each backend the run selects
(Docker; TES where Funnel runs and ``-m`` keeps it). ``CRANK_DIFF_EXAMPLES`` sets the number of
workflows (default 4); ``CRANK_DIFF_SEED`` draws another fixed series instead of the default
one; ``CRANK_DIFF_ALL=1`` draws the features of ``OPEN`` too. ``FEATURES`` holds one fixed
workflow with every way a job looks at its inputs, every kind of link a job makes and every
shadow depth, so that each run sees them all whatever the series draws.
"""

import csv
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import SNAKEMAKE_IMAGE, OnDocker, OnDockerCopying, OnTes

EXAMPLES = int(os.environ.get("CRANK_DIFF_EXAMPLES") or 0)
SEED = os.environ.get("CRANK_DIFF_SEED")
EVERY_FEATURE = os.environ.get("CRANK_DIFF_ALL") == "1"

# Features with a difference still open on a backend: drawn there only with CRANK_DIFF_ALL=1,
# so that the default run stays a check of everything else.
OPEN = {
    "docker": set(),
    "tes": set(),
}

# The simplest of each choice comes first: Hypothesis shrinks towards it.
KINDS = ["file", "dir", "temp", "protected", "touch", "update", "symlink", "checkpoint", "temp_dir",
         "made_link", "made_dir_link"]
FILE_KINDS = ("file", "temp", "protected", "update")
DIR_KINDS = ("dir", "checkpoint", "temp_dir", "made_dir_link")
# outputs that are links to what the job made beside them (<output>.real)
MADE_LINKS = ("made_link", "made_dir_link")
# what a job does with its inputs besides reading them (see look_of)
LOOKS = ["none", "tar", "copy", "count", "kinds", "times", "ls"]
SHADOWS = [None, "minimal", "shallow", "full", "copy-minimal"]
SHADOW_KINDS = ("file", "dir", "temp", "protected")
# data/ext.txt and data/extdir are symlinks to OUTSIDE/ref.txt and OUTSIDE/refdir; data/dir
# holds a symlink to a file and one back to itself
SOURCES = ["data/src.txt", "data/link.txt", "data/with space.txt", "data/dir", "OUTSIDE/ref.txt",
           "OUTSIDE/refdir", "data/ext.txt", "data/extdir", "data/tool.sh"]
DIR_SOURCES = ("data/dir", "OUTSIDE/refdir", "data/extdir")
NAMES = ["plain", "space", "nested", "odd"]
EDITS = ["none", "append_src", "append_outside", "same_size_same_mtime", "code", "remove_output"]
FLAGS = ["none", "forceall", "forcerun"]


@dataclass(frozen=True)
class Rule:
    kind: str = "file"
    name: str = "plain"  # of NAMES: the output's name has a space, is deeper, or has ü and '
    deps: tuple = ()  # indexes of earlier rules whose outputs it reads
    sources: tuple = ()  # entries of SOURCES it reads
    log: bool = False
    exit_code: int = 0
    group: Optional[str] = None
    link_in_dir: bool = False  # a directory output holds a symlink too
    empty_dir: bool = False  # a directory output holds an empty directory too
    files: int = 1  # files a checkpoint writes
    executable: bool = False  # a file output made executable
    binary: bool = False  # a file output holds bytes that are not text
    look: str = "none"  # of LOOKS: how the job inspects its inputs
    shadow: Optional[str] = None  # of SHADOWS
    declared_target: bool = False  # a MADE_LINKS output's target is an output too
    link_out: bool = False  # a directory output holds a link to a file the job made beside it


@dataclass(frozen=True)
class Workflow:
    rules: tuple
    seed_update: bool = False  # update() outputs exist, with old content, before the first run
    edit: str = "none"
    flags: str = "none"
    forcerun: int = 0  # the rule -R names
    version: int = 0  # in every rule's command: the "code" edit changes it


@st.composite
def workflows(draw, left_out=frozenset()):
    """``left_out``: features not to draw (OPEN)."""
    kinds = [k for k in KINDS if not (k == "symlink" and "symlink_output" in left_out)
             and not (k in MADE_LINKS and "made_links" in left_out)]
    looks = [k for k in LOOKS if k == "none" or "looks" not in left_out]
    shadows = [m for m in SHADOWS if m is None or "shadow" not in left_out]
    sources = [s for s in SOURCES if not (s == "data/extdir" and "linked_dir_input" in left_out)]
    n = draw(st.integers(1, 5))
    rules = []
    doomed = []  # fails, or reads what a failing job makes
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        deps = tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=2)))) if i else ()
        exit_code = draw(st.sampled_from([0, 0, 0, 3]))
        directory = kind in DIR_KINDS
        chosen = tuple(sorted(draw(st.sets(st.sampled_from(sources), max_size=2))))
        shadow = draw(st.sampled_from(shadows)) if kind in SHADOW_KINDS else None
        # the links and copies a shadow directory makes of the inputs are made when the job
        # starts: their times are not the sources' (shallow links the top-level entries only)
        seen = [k for k in looks if shadow in (None, "shallow") or k not in ("times", "ls")]
        look = draw(st.sampled_from(seen)) if deps or chosen else "none"
        rules.append(Rule(
            kind=kind,
            name=draw(st.sampled_from(NAMES)),
            deps=deps,
            sources=chosen,
            log=draw(st.booleans()),
            exit_code=exit_code,
            # A group fails, or never starts, as a whole under every remote executor
            # (Snakemake removes the outputs of all its jobs): the local executor, which runs no
            # groups, is no reference for a group with a failing job or one downstream of it.
            # A shadow rule's group would run in --container-image, which the runs here leave
            # to Snakemake's default (an image from a registry).
            group=None if exit_code or shadow or any(doomed[d] for d in deps)
            else draw(st.sampled_from([None, "g1", "g2"])),
            link_in_dir=directory and "dir_links" not in left_out and draw(st.booleans()),
            empty_dir=directory and "empty_dirs" not in left_out and draw(st.booleans()),
            files=draw(st.integers(0, 3)) if kind == "checkpoint" else 1,
            executable=kind in FILE_KINDS and "executable" not in left_out and draw(st.booleans()),
            binary=kind in FILE_KINDS and draw(st.booleans()),
            look=look,
            shadow=shadow,
            # What a failed job wrote beside its outputs stays where it ran: on TES only its
            # log files come back (Snakemake removes its outputs), so a failing job's link
            # target is one of its outputs, and it makes no other file
            declared_target=kind in MADE_LINKS and (bool(exit_code) or draw(st.booleans())),
            link_out=directory and kind != "made_dir_link" and "made_links" not in left_out
            and not exit_code and draw(st.booleans()),
        ))
        doomed.append(bool(exit_code) or any(doomed[d] for d in deps))
    rules = convex_groups(rules)
    edit = draw(st.sampled_from(EDITS))
    flags = draw(st.sampled_from(FLAGS))
    return Workflow(
        rules=tuple(rules),
        seed_update=draw(st.booleans()) if any(r.kind == "update" for r in rules) else False,
        edit=edit, flags=flags,
        forcerun=draw(st.integers(0, n - 1)) if flags == "forcerun" else 0,
    )


def convex_groups(rules: list) -> tuple:
    """A rule leaves its group where a path from the group leaves it and comes back to the
    rule (Snakemake refuses such a group with a remote executor; the local executor runs no
    groups)."""
    rules = list(rules)
    ancestors = []
    for rule in rules:
        ancestors.append(set(rule.deps).union(*(ancestors[d] for d in rule.deps)))
    changed = True
    while changed:
        changed = False
        for i, rule in enumerate(rules):
            if rule.group and any(
                rules[d].group != rule.group and any(rules[a].group == rule.group for a in ancestors[d])
                for d in rule.deps
            ):
                rules[i] = replace(rule, group=None)
                changed = True
    return tuple(rules)


# ---------------------------------------------------------------- the Snakefile, as text


def output_path(i: int, rule: Rule) -> str:
    stem = {"plain": f"out/r{i}", "space": f"out/r{i} x", "nested": f"out/deep/er/r{i}",
            "odd": f"out/r{i}-\u00fc 'q'"}[rule.name]
    return stem + (".d" if rule.kind in DIR_KINDS else ".lnk" if rule.kind in ("symlink", "made_link")
                   else ".txt")


def output_decl(i: int, rule: Rule) -> str:
    path = repr(output_path(i, rule))
    wrap = {"dir": "directory", "checkpoint": "directory", "temp": "temp", "protected": "protected",
            "touch": "touch", "update": "update", "made_dir_link": "directory"}.get(rule.kind)
    if rule.kind == "temp_dir":
        return f"temp(directory({path}))"
    decl = f"{wrap}({path})" if wrap else path
    if rule.declared_target:  # the link's target, made by the job too
        target = repr(output_path(i, rule) + ".real")
        decl += f", directory({target})" if rule.kind == "made_dir_link" else f", {target}"
    return decl


# Writes every input to stdout: a file's name and content, a directory's sorted listing and the
# content of each file in it (through symlinks), "(x)" before an executable file's content. Paths are printed as given: relative inside the
# workdir, absolute outside it, so the three copies print the same.
DUMP = ('for f in {input:q}; do echo "== $f"; if [ -d "$f" ]; then '
        'find "$f" | sort | while IFS= read -r p; do echo "-- $p"; '
        'if [ -f "$p" ]; then if [ -x "$p" ]; then echo "(x)"; fi; cat "$p"; fi; done; '
        'else if [ -x "$f" ]; then echo "(x)"; fi; cat "$f"; fi; done')


DUMP_MARK = "\0DUMP\0"

# Lists the tree $1 the same way with busybox and coreutils: each path (sorted), its kind,
# and a link's target text, or a directory's mode, or a file's mode, size and content.
LIST = (
    'crank_list() {{ find "$1" | LC_ALL=C sort | while IFS= read -r p; do '
    'if [ -L "$p" ]; then echo "L $p -> $(readlink "$p")"; '
    'elif [ -d "$p" ]; then echo "D $p $(stat -c %a "$p")"; '
    'else echo "F $p $(stat -c %a "$p") $(wc -c < "$p")"; cat "$p"; echo; fi; done; }}; '
)
# Absolute paths into the workdir (shadow links) name each copy's own workdir: not compared.
SAME_WORKDIR = "sed 's|/[^ ]*/wf/|WD/|g'"


def look_of(i: int, rule: Rule, inputs: list, files: list, sources: list) -> str:
    """The command rule ``i`` runs on its inputs for ``rule.look`` (output on stdout):
    ``inputs`` all of them, ``files`` those that are not directories, ``sources`` those of the
    workdir's fixed sources (their times are the same in every copy). Paths are quoted here:
    they are literals of the Snakefile. Scratch directories are the rule's own (jobs run at
    the same time in one workdir)."""
    q = " ".join(shlex.quote(p) for p in inputs)
    x, c, p = f".x{i}", f".c{i}", f".p{i}"
    if rule.look == "tar":
        # the listing's kind, mode, size, name and link target (owners and the format of
        # times differ between tar programs); then the archive's bytes, extracted
        return (f"tar cf - {q} 2>/dev/null | LC_ALL=C.UTF-8 tar tvf - | awk '{{{{$2=\"\"; $4=\"\"; $5=\"\"; print}}}}'"
                f" | LC_ALL=C sort; rm -rf {x}; mkdir {x}; tar cf - {q} 2>/dev/null | tar xf - -C {x}; "
                f"{LIST}crank_list {x}; rm -rf {x}")
    if rule.look == "copy":
        plain = " ".join(shlex.quote(f) for f in files)
        copies = f"rm -rf {c} {p}; mkdir {c} {p}; cp -a {q} {c}/; {LIST}crank_list {c}"
        if plain:
            copies += f"; cp -P {plain} {p}/; crank_list {p}"
        return copies + f"; rm -rf {c} {p}"
    if rule.look == "count":
        return (f"for f in {q}; do echo \"$f $(find \"$f\" -type f | wc -l) "
                f"$(find \"$f\" -type l | wc -l)\"; done")
    if rule.look == "kinds":
        return (f"for f in {q}; do if test -L \"$f\"; then k=L; else k=-; fi; "
                f"echo \"$k $(stat -c '%F %a' \"$f\") $f\"; done")
    src = " ".join(shlex.quote(f) for f in sources)
    if rule.look == "times" and sources:
        # whole seconds: what busybox's stat shows
        return (f"for f in {src}; do find \"$f\" | LC_ALL=C sort | while IFS= read -r p; do "
                f"stat -c '%Y %n' \"$p\"; done; done")
    if rule.look == "ls" and sources:
        # coreutils (the rule's image has them): ls's times, and stat's to the nanosecond
        return (f"ls -l --time-style=+%s {src} | grep -v '^total' | awk '{{{{$2=\"\"; $3=\"\"; $4=\"\"; print}}}}'; "
                f"for f in {src}; do find \"$f\" | LC_ALL=C sort | while IFS= read -r p; do "
                f"stat -c '%.9Y %n' \"$p\"; done; done")
    return "true"


def shell_expression(command: str) -> str:
    """The command as a Python expression of the Snakefile, DUMP spelled once at its top."""
    return " + DUMP + ".join(repr(part) for part in command.split(DUMP_MARK))


def shell_of(i: int, rule: Rule, version: int, look: str = "true") -> str:
    """``look``: the rule's command on its inputs (look_of)."""
    mark = f"echo r{i}-{version}"
    dump = DUMP_MARK if (rule.deps or rule.sources) else "true"
    if look != "true":
        dump = f"( {dump}; ( {look} ) | {SAME_WORKDIR} )"
    steps = []
    if rule.log:
        steps.append(f"echo log-r{i} > {{log:q}}")
    if rule.binary:
        mark += r"; printf '\377\000\001\n'"
    if rule.kind in ("file", "temp", "protected"):
        steps += [f"( {dump}; {mark} ) > {{output:q}}"]
    elif rule.kind == "update":
        steps += [f"( {dump}; {mark} ) >> {{output:q}}"]
    elif rule.kind == "touch":
        steps += [f"{dump} > /dev/null"]
    elif rule.kind == "symlink":
        up = "../" * output_path(i, rule).count("/")
        steps += [f"{dump} > /dev/null", f"ln -s {up}data/src.txt {{output:q}}"]
    elif rule.kind in ("dir", "temp_dir"):
        steps += ["mkdir -p {output:q}/sub",
                  f"{dump} > {{output:q}}/sub/content", f"{mark} > {{output:q}}/top.txt"]
    elif rule.kind == "checkpoint":
        steps += ["mkdir -p {output:q}", f"{dump} > {{output:q}}/inputs.log"]
        steps += [f"{mark}-{n} > {{output:q}}/{n}.txt" for n in range(rule.files)]
    elif rule.kind == "made_link":  # a link to a file the job made beside it
        steps += [f"( {dump}; {mark} ) > {{output[0]:q}}.real",
                  'ln -s "$(basename {output[0]:q}).real" {output[0]:q}']
    elif rule.kind == "made_dir_link":  # ... to a directory it made
        steps += ["mkdir -p {output[0]:q}.real/sub", f"{dump} > {{output[0]:q}}.real/sub/content",
                  f"{mark} > {{output[0]:q}}.real/top.txt",
                  'ln -s "$(basename {output[0]:q}).real" {output[0]:q}']
    # -p and -f: what a made_dir_link output leads to is no output, so the local executor
    # leaves it in place for a second run (the task starts without it)
    if rule.empty_dir:
        steps.append("mkdir -p {output[0]:q}/empty")
    if rule.executable:
        steps.append("chmod 755 {output:q}")
    if rule.link_in_dir:
        steps.append("ln -sfn top.txt {output[0]:q}/alias" if rule.kind != "checkpoint"
                     else "ln -s inputs.log {output:q}/alias.txt")
    if rule.link_out:  # a link from inside the directory to a file the job made beside it
        steps += ["echo side > {output[0]:q}.side", 'ln -s "../$(basename {output[0]:q}).side" {output[0]:q}/side']
    if rule.exit_code:
        steps.append(f"exit {rule.exit_code}")
    return "; ".join(steps)


def snakefile(wf: Workflow, outside: Path) -> str:
    lines = ["import glob", "", f"DUMP = {DUMP!r}", "", "rule all:", "    input:"]
    lines += [f"        {output_path(i, r)!r}," for i, r in enumerate(wf.rules)]
    lines.append("")
    for i, rule in enumerate(wf.rules):
        static = [output_path(d, wf.rules[d]) for d in rule.deps if wf.rules[d].kind != "checkpoint"]
        static += [s.replace("OUTSIDE", str(outside)) for s in rule.sources]
        checkpoints = [d for d in rule.deps if wf.rules[d].kind == "checkpoint"]
        if checkpoints:
            lines += [f"def inputs_r{i}(wildcards):", f"    found = {static!r}"]
            lines += [f"    found += sorted(glob.glob(checkpoints.r{d}.get().output[0] + '/*.txt'))"
                      for d in checkpoints]
            lines += ["    return found", ""]
        lines.append(f"{'checkpoint' if rule.kind == 'checkpoint' else 'rule'} r{i}:")
        if checkpoints:
            lines.append(f"    input: inputs_r{i}")
        elif static:
            lines.append(f"    input: {', '.join(repr(s) for s in static)}")
        lines.append(f"    output: {output_decl(i, rule)}")
        if rule.log:
            lines.append(f"    log: 'logs/r{i}.log'")
        if rule.group:
            lines.append(f"    group: {rule.group!r}")
        if rule.shadow:
            lines.append(f"    shadow: {rule.shadow!r}")
        if rule.shadow or rule.look == "ls":  # Snakemake, or coreutils, in the image
            lines.append(f"    container: {SNAKEMAKE_IMAGE!r}")
        files = [output_path(d, wf.rules[d]) for d in rule.deps if wf.rules[d].kind not in DIR_KINDS]
        files += [s.replace("OUTSIDE", str(outside)) for s in rule.sources if s not in DIR_SOURCES]
        own = [s.replace("OUTSIDE", str(outside)) for s in rule.sources]
        look = look_of(i, rule, static, files, own) if not checkpoints else "true"
        lines += [f"    shell: {shell_expression(shell_of(i, rule, wf.version, look))}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- workdirs, runs, snapshots


def make_sources(workdir: Path, outside: Path) -> None:
    data = workdir / "data"
    (data / "dir" / "sub").mkdir(parents=True)
    (data / "src.txt").write_text("source\n")
    (data / "link.txt").symlink_to("src.txt")
    (data / "with space.txt").write_text("spaced\n")
    (data / "dir" / "a.txt").write_text("a\n")
    (data / "dir" / "sub" / "b.txt").write_text("b\n")
    (data / "dir" / "sub" / "b.txt").chmod(0o755)
    (data / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (data / "tool.sh").chmod(0o755)
    (data / "dir" / "to-a").symlink_to("a.txt")
    (data / "dir" / "sub" / "up").symlink_to("..")  # a loop, for programs that follow links
    (data / "dir" / "sub" / "gone").symlink_to("nowhere")  # dangling
    (data / "dir" / "ping").symlink_to("pong")  # a cycle of links
    (data / "dir" / "pong").symlink_to("ping")
    (data / "dir" / "empty").mkdir()
    (data / "ext.txt").symlink_to(outside / "ref.txt")
    (data / "extdir").symlink_to(outside / "refdir")
    fixed_times(data)


def make_outside(outside: Path) -> None:
    (outside / "refdir" / "deep").mkdir(parents=True)
    (outside / "ref.txt").write_text("outside ref\n")
    (outside / "refdir" / "x.txt").write_text("x\n")
    (outside / "refdir" / "deep" / "y.txt").write_text("y\n")
    (outside / "refdir" / "to-x").symlink_to("x.txt")
    fixed_times(outside)


def fixed_times(top: Path) -> None:
    """Every path below ``top`` (and itself) gets a modification time of its own that is the
    same in every copy of the workdir (nanoseconds included), directories last."""
    paths = sorted(top.rglob("*"), key=lambda p: (-len(p.parts), str(p))) + [top]
    for n, path in enumerate(paths):
        ns = 1_500_000_000_000_000_000 + n * 86_400_123_456_789
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def seed_outputs(workdir: Path, wf: Workflow) -> None:
    for i, rule in enumerate(wf.rules):
        if rule.kind == "update" and wf.seed_update:
            path = workdir / output_path(i, rule)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("old\n")


# the time an edited source gets, the same in both copies (jobs show the times of sources)
EDITED_AT = {}


def edit(workdir: Path, outside: Optional[Path], wf: Workflow) -> None:
    """The edit between the two runs (outside: only by the first caller, it is shared)."""
    if wf.edit == "append_src":
        with open(workdir / "data" / "src.txt", "a") as f:
            f.write("edited\n")
        # newer than the first run's outputs, as an edit is, and the same in both copies
        ns = EDITED_AT.setdefault(wf, time.time_ns())
        os.utime(workdir / "data" / "src.txt", ns=(ns, ns))
    elif wf.edit == "append_outside" and outside is not None:
        with open(outside / "ref.txt", "a") as f:
            f.write("edited\n")
    elif wf.edit == "remove_output":
        path = workdir / output_path(0, wf.rules[0])
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
    elif wf.edit == "same_size_same_mtime":
        path = workdir / "data" / "src.txt"
        before = path.stat()
        path.write_text("SOURCE\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def second_run_args(wf: Workflow) -> Optional[list]:
    if wf.edit == "none" and wf.flags == "none":
        return None
    return {"none": [], "forceall": ["-F"], "forcerun": ["-R", f"r{wf.forcerun}"]}[wf.flags]


def snapshot(workdir: Path) -> dict:
    """Every path under the workdir but .snakemake/: its kind, content or link target, mode."""
    found = {}
    for root, dirs, files in os.walk(workdir):
        rel_root = Path(root).relative_to(workdir)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != ".snakemake"]
        for name in sorted(dirs + files):
            path = Path(root) / name
            st_ = path.lstat()
            mode = stat.S_IMODE(st_.st_mode)
            if stat.S_ISLNK(st_.st_mode):
                found[str(rel_root / name)] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                found[str(rel_root / name)] = ("dir", oct(mode))
            else:
                found[str(rel_root / name)] = ("file", oct(mode), path.read_bytes())
    return found


def differences(local: dict, other: dict) -> list:
    lines = []
    for path in sorted(set(local) | set(other)):
        if local.get(path) != other.get(path):
            lines.append(f"  {path!r}: local {local.get(path, 'missing')!r}, crank {other.get(path, 'missing')!r}")
    return lines


def run_local(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir,
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def make_workdir(workdir: Path, wf: Workflow, text: str, outside: Path) -> Path:
    """``workdir`` made with the workflow's Snakefile (``text``), sources and seeded outputs."""
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(text)
    make_sources(workdir, outside)
    seed_outputs(workdir, wf)
    return workdir


def check_same_as_local(base: Path, wf: Workflow, backends: dict) -> None:
    """Run the workflow under the local executor once and under crank on each backend
    (``backends``: name -> ``run(workdir, *args)``), each in its own copy; after each step
    every copy must hold what the local one holds, and end with its exit status."""
    example = base / f"ex-{uuid.uuid4().hex[:10]}"
    outside = example / "outside"
    make_outside(outside)
    text = snakefile(wf, outside)
    workdirs = {}
    # a crank copy's parent names the TES storage prefix: one of its own per example
    for name in ("local", *backends):
        parent = "local" if name == "local" else f"{name}-{example.name}"
        workdirs[name] = make_workdir(example / parent / "wf", wf, text, outside)

    steps = [["--keep-going"]]
    again = second_run_args(wf)
    if again is not None:
        steps.append(["--keep-going", *again])
    for number, args in enumerate(steps):
        if number:
            if wf.edit == "code":
                changed = replace(wf, version=wf.version + 1)
                for workdir in workdirs.values():
                    (workdir / "Snakefile").write_text(snakefile(changed, outside))
            for name, workdir in workdirs.items():  # the outside directory is shared: edited once
                edit(workdir, outside if name == "local" else None, wf)
        local = run_local(workdirs["local"], *args)
        expected = snapshot(workdirs["local"])
        for name, run_crank in backends.items():
            crank = run_crank(workdirs[name], *args)
            diff = differences(expected, snapshot(workdirs[name]))
            if local.returncode != crank.returncode:
                diff.insert(0, f"  exit status: local {local.returncode}, crank {crank.returncode}")
            if diff:
                pytest.fail(
                    f"crank on {name} differs from the local executor after run {number + 1} of "
                    f"{len(steps)} (edit {wf.edit!r}, flags {args!r}; {outside} is outside the "
                    "workdir):\n" + "\n".join(diff) + f"\n\nSnakefile:\n{text}\n\n"
                    f"local stderr (end):\n{tail(local.stderr)}\n\ncrank stderr (end):\n{tail(crank.stderr)}",
                    pytrace=False,
                )


def differential(default_examples: int):
    """The settings every backend's differential test shares."""
    def wrap(test):
        test = settings(
            deadline=None, max_examples=EXAMPLES or default_examples, database=None,
            derandomize=SEED is None, print_blob=False,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )(test)
        return seed(int(SEED))(test) if SEED is not None else test
    return wrap


# ---------------------------------------------------------------- the backends


def selected(config, mark: str) -> bool:
    """Whether ``-m`` selects tests with this mark (and no other)."""
    expression = config.getoption("markexpr")
    if not expression:
        return True
    from _pytest.mark.expression import Expression

    return Expression.compile(expression).evaluate(lambda name: name == mark)


@pytest.fixture
def backends(request, docker_api) -> dict:
    """``run(workdir, *args)`` for each backend the run selects: Docker (binding the files, and
    copying them), and TES where Funnel
    runs (its absence is said once, loudly, by the tes fixture) and ``-m`` does not leave it
    out. The local executor runs once per workflow for all of them."""
    found = {"docker": OnDocker(docker_api).run, "docker-copy": OnDockerCopying(docker_api).run}
    if selected(request.config, "tes"):
        try:
            found["tes"] = OnTes(request.getfixturevalue("tes")).run
        except pytest.skip.Exception:
            pass
    return found


def drawn():
    left_out = set() if EVERY_FEATURE else set().union(*OPEN.values())
    return workflows(left_out=frozenset(left_out))


@pytest.mark.slow
@pytest.mark.docker
@differential(default_examples=4)
@given(wf=drawn())
def test_crank_leaves_what_the_local_executor_leaves(backends, tmp_path, wf):
    # copying is compared on the drawn features and the cases found (below): the series
    # would take half as long again
    check_same_as_local(tmp_path, wf, {k: v for k, v in backends.items() if k != "docker-copy"})


# ---------------------------------------------------------------- differences found, fixed

FOUND = {
    # a group's later job reads a touch() output of an earlier one: it did not exist yet
    "group_touch": Workflow(rules=(Rule(kind="touch", group="g1"),
                                   Rule(deps=(0,), group="g1"))),
    # ... or lists a directory output of an earlier one: no .snakemake_timestamp in it yet
    "group_directory": Workflow(rules=(Rule(kind="dir", group="g1"),
                                       Rule(deps=(0,), group="g1"))),
    # a group's later job reads a checkpoint of the group: it ran with the checkpoint's
    # directory as its input, not with what its input function returns after the checkpoint
    "group_checkpoint": Workflow(rules=(Rule(kind="checkpoint", group="g1", files=2),
                                        Rule(deps=(0,), group="g1"))),
    # ... and a later one reads both: it runs after the other reader, whatever the order
    # Snakemake gave them before the checkpoint ran
    "group_checkpoint_readers": Workflow(rules=(
        Rule(kind="checkpoint", group="g1", files=1), Rule(deps=(0,), group="g1"),
        Rule(deps=(0, 1), group="g1"), Rule(deps=(0,), group="g1"))),
    # ... when the checkpoint reads a job outside the group, Snakemake's group holds the reader
    # twice (made before the checkpoint, and again): both ran, one before the checkpoint
    "group_checkpoint_twice": Workflow(rules=(
        Rule(log=True, binary=True),
        Rule(sources=("data/link.txt", "data/src.txt"), log=True, executable=True),
        Rule(kind="checkpoint", deps=(0,), sources=("data/src.txt",), log=True, group="g2",
             files=0),
        Rule(deps=(0, 2), group="g2"))),
    # a job that failed before writing its log (here Snakemake cannot copy a directory input
    # into a copy-minimal shadow directory): no log, where the local executor leaves it empty
    "failed_without_log": Workflow(rules=(Rule(sources=("data/extdir",), log=True, shadow="copy-minimal"),)),
}


# found on TES only (the task's files travel through object storage, which keeps no symlinks,
# modes or empty directories)
FOUND_ON_TES = {
    # an output that is a symlink: missing when its target was no input of the job (dangling
    # in the task), else a copy of the target
    "symlink_output": Workflow(rules=(Rule(kind="symlink"),
                                      Rule(kind="symlink", sources=("data/src.txt",)))),
    # a symlink inside a directory output came back as a copy of its target
    "dir_links": Workflow(rules=(Rule(kind="dir", link_in_dir=True),)),
    # an output's mode came back 0644 (0444 when protected()): its execute bits lost
    "executable": Workflow(rules=(Rule(executable=True), Rule(kind="protected", executable=True))),
    # a symlink to a directory, as an input, was a real directory in the job
    "linked_dir_input": Workflow(rules=(Rule(sources=("data/extdir",)),)),
    # an empty directory inside a directory input was not made
    "empty_dirs": Workflow(rules=(Rule(kind="dir", empty_dir=True), Rule(deps=(0,)))),
    # an executable input, alone or in a directory input, was not executable in the job
    "executable_input": Workflow(rules=(Rule(sources=("data/dir", "data/tool.sh")),)),
}


# Every feature the generator draws for jobs that look at what they were given and made,
# drawn here once each, whatever the series draws: a CI run sees them all on both backends.
FEATURES = {
    "every_look": Workflow(rules=(
        # archives, copies, counts, kinds and times of files, links and directories, inside
        # the workdir and outside; outputs that are links to what the job made, declared or
        # not, and a link from inside a directory output to a file the job made beside it
        Rule(sources=("data/dir", "data/link.txt"), look="times"),
        Rule(kind="made_link", sources=("OUTSIDE/ref.txt", "data/extdir"), look="copy"),
        Rule(kind="dir", name="space", deps=(0, 1), sources=("data/with space.txt",), look="count",
             link_out=True),
        Rule(kind="made_dir_link", deps=(2,), sources=("data/ext.txt", "data/tool.sh"), look="kinds",
             declared_target=True),
        Rule(kind="made_dir_link", name="odd", deps=(1,), sources=("data/dir", "data/link.txt"), look="ls"),
        Rule(kind="made_link", deps=(3, 4), sources=("OUTSIDE/refdir", "data/dir"), look="tar",
             declared_target=True),
        # every shadow depth, each job looking at its inputs as the shadow directory shows them
        Rule(sources=("data/dir", "data/link.txt"), look="tar", shadow="minimal"),
        Rule(kind="dir", sources=("data/src.txt", "data/extdir"), look="kinds", shadow="shallow"),
        Rule(kind="protected", deps=(6, 7), look="count", shadow="full"),
        Rule(sources=("data/link.txt", "data/tool.sh"), deps=(6,), look="copy", shadow="copy-minimal"),
    )),
}


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features(backends, tmp_path, name):
    check_same_as_local(tmp_path, FEATURES[name], backends)


def side_by_side(*parts: Workflow) -> Workflow:
    """One workflow whose rules are the parts' rules, each part apart from the others (its
    rule numbers shifted, its groups named anew): one run per backend checks them all."""
    rules = []
    for n, part in enumerate(parts):
        shift = len(rules)
        rules += [replace(r, deps=tuple(d + shift for d in r.deps), group=r.group and f"{r.group}p{n}")
                  for r in part.rules]
    return Workflow(rules=tuple(rules))


# A group holding a checkpoint runs alone: side by side, Snakemake can still change the jobs
# (and the hash) of a group whose outcome is taken in with another's, and stop with
# KeyError: JobGroup (group_runs.py; docs/further.md)
ALONE = [name for name, wf in FOUND.items() if any(r.kind == "checkpoint" for r in wf.rules)]


@pytest.mark.docker
@pytest.mark.parametrize("names", [[name] for name in ALONE] + [[n for n in FOUND if n not in ALONE]],
                         ids=lambda names: "+".join(names))
def test_found(backends, tmp_path, names):
    """The differences found and fixed (FOUND), side by side in one workflow where they can."""
    check_same_as_local(tmp_path, side_by_side(*(FOUND[n] for n in names)), backends)


@pytest.mark.docker
def test_a_group_submitted_again_while_it_runs_runs_its_jobs_once(docker_api, tmp_path):
    """The groups holding a checkpoint side by side: Snakemake submits a running one again
    when another's checkpoint ends, and again once it ended, at times as the same group
    object with other jobs and another hash. Each job runs once, as under the local
    executor: two runs of a group wrote the same files at once (with copied files the second
    removed the first's checkpoint output and the run failed). Snakemake's scheduler can
    still fail to remove a group whose jobs it changed as another's outcome was taken in."""
    wf = side_by_side(*(FOUND[n] for n in ALONE))
    outside = tmp_path / "outside"
    make_outside(outside)
    workdir = make_workdir(tmp_path / "wf", wf, snakefile(wf, outside), outside)
    done = OnDockerCopying(docker_api).run(workdir, "--keep-going")
    with open(workdir / ".snakemake" / "crank" / "usage" / "latest.tsv") as table:
        ran = Counter((row["rule"], row["jobid"]) for row in csv.DictReader(table, delimiter="\t"))
    assert ran and max(ran.values()) == 1, (ran, done.stderr[-3000:])
    if done.returncode:  # Snakemake's own failure to remove a group whose jobs it changed
        assert "KeyError: JobGroup" in done.stderr, done.stderr[-3000:]
    else:
        assert len(ran) == len(wf.rules), ran


@pytest.mark.tes
def test_found_on_tes(backends, tmp_path):
    """The differences found on TES and fixed (FOUND_ON_TES), side by side in one workflow."""
    if "tes" not in backends:
        pytest.skip("a difference found on TES; TES is not selected or not available")
    check_same_as_local(tmp_path, side_by_side(*FOUND_ON_TES.values()), {"tes": backends["tes"]})
