"""The bind mounts of a task: every input and output visible at its own absolute path,
in few mounts however many inputs there are."""

from __future__ import annotations

import bisect
import collections
import functools
import os
from typing import Dict, List, Sequence, Tuple

from ..paths import under

# read-only mounts for inputs outside the workdir before inputs of a directory share
# one mount of it: thousands of mounts make a container slow to create and start
MAX_INPUT_MOUNTS = 32
# never mounted as a whole for inputs in them: the image's own (system) directories
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
               "/proc", "/run", "/sbin", "/sys", "/usr", "/var")


def plan_mounts(
    workdir: str, inputs: Sequence[str], outputs: Sequence[str]
) -> List[Tuple[str, bool]]:
    """Bind mounts (path, writable) that make every input and output visible at its
    own absolute path: the workdir read-write, the directories of outputs outside it
    read-write, inputs outside both read-only (symlinks followed to their target).

    Inputs are mounted one by one up to MAX_INPUT_MOUNTS; beyond, directories holding
    several of them are mounted instead (see _merged). O(n log n) for n paths (times
    their depth)."""
    writable = _outermost([workdir] + [os.path.dirname(out) for out in outputs])
    candidates = []
    real_dirs: Dict[str, str] = {}
    for path in inputs:
        candidates.append(path)
        real = _realpath(path, real_dirs)
        if real != path:
            candidates.append(real)
    readonly = _outermost([p for p in candidates if not _covered(p, writable)])
    if len(readonly) > MAX_INPUT_MOUNTS:
        readonly = _merged(readonly, writable)
    return [(p, True) for p in writable] + [(p, False) for p in readonly]


def _realpath(path: str, real_dirs: Dict[str, str]) -> str:
    """os.path.realpath, resolving each directory once for all the files in it."""
    parent, name = os.path.split(path)
    if name in ("", os.curdir, os.pardir) or os.path.islink(path):
        return os.path.realpath(path)
    if parent not in real_dirs:
        real_dirs[parent] = os.path.realpath(parent)
    return os.path.join(real_dirs[parent], name)


def _key(path: str) -> Tuple[str, ...]:
    # sorted by this, a directory comes right before everything under it
    return tuple(path.rstrip("/").split("/"))


def _outermost(paths: Sequence[str]) -> List[str]:
    """The paths not under another one of them, sorted (see _key)."""
    kept: List[str] = []
    for path in sorted(set(paths), key=_key):
        if not kept or not under(path, kept[-1]):
            kept.append(path)
    return kept


def _covered(path: str, mounts: Sequence[str]) -> bool:
    """``path`` is under one of ``mounts`` (outermost, sorted by _key)."""
    at = bisect.bisect_right(mounts, _key(path), key=_key)
    return at > 0 and under(path, mounts[at - 1])


def _holds(directory: str, mounts: Sequence[str]) -> bool:
    """One of ``mounts`` (sorted by _key) is ``directory`` or lies below it."""
    at = bisect.bisect_left(mounts, _key(directory), key=_key)
    return at < len(mounts) and under(mounts[at], directory)


def _merged(readonly: List[str], writable: List[str]) -> List[str]:
    """Fewer read-only mounts: directories holding several of them mount instead, the
    deepest first, until MAX_INPUT_MOUNTS are left or no directory may be mounted. Never
    mounted so: ``/`` or a top-level directory, a system directory, the user's home, a
    directory holding the workdir or an output directory (it would be read-only there)."""
    home = os.path.expanduser("~")

    @functools.lru_cache(maxsize=None)
    def mountable(directory: str) -> bool:
        return not (
            directory.count("/") < 2 or directory == home
            or any(under(directory, d) for d in SYSTEM_DIRS) or _holds(directory, writable)
        )

    def ancestors(path: str):
        """The directories above ``path`` that may be mounted, the nearest first (those
        above one that may not, may not either: they hold it)."""
        while True:
            path = os.path.dirname(path)
            if not mountable(path):
                return
            yield path

    chains = {m: list(ancestors(m)) for m in readonly}
    holding = collections.Counter(d for chain in chains.values() for d in chain)
    left = len(readonly)
    chosen = set()
    for directory in sorted(holding, key=lambda d: (-d.count("/"), d)):
        if left <= MAX_INPUT_MOUNTS:
            break
        k = holding[directory]
        if k < 2:
            continue
        chosen.add(directory)
        left -= k - 1
        for above in ancestors(directory):
            holding[above] -= k - 1

    def mount_for(path: str) -> str:
        return next((d for d in reversed(chains[path]) if d in chosen), path)

    return _outermost([mount_for(m) for m in readonly])
