"""A finished task's products into place, as the local executor leaves them: each product
whole or not at all, its modes, its symlinks with their target text; and where a link leads
to something the job made inside the workdir (``script``: the task sends it along as
``q<N>``), that too, at the path the link names.

The task is not trusted with where anything goes. A link's target is installed only where its
own text leads, computed here: inside the workdir (not under ``.snakemake``), through no
symlink, and never at or in a product, at or in something crank put in place for the job (an
input, a directory on the way to one, a source), or at a directory holding one of them. A
directory arrives entry by entry into what is there (nothing else in it goes away, as the job
would have left it); a file never replaces a directory. Anything else comes back as the link
alone. A link to what the job made outside the workdir gives a warning.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from ...staging.install import install, install_link, merge_into
from ...task import TaskSpec
from ..guard import Guard
from . import layout

Texts = Dict[Tuple[str, str], str]  # (name, link in it: '.' itself) -> the link's target text


def install_all(tmp: str, task: TaskSpec, only: Optional[Collection[str]] = None) -> List[str]:
    """Move every product under ``tmp`` (of the names in ``only``, when given) into place,
    then what their links lead to; the warnings to give."""
    try:
        with open(os.path.join(tmp, layout.INDEX)) as f:
            index = layout.read_index(f.read())
    except FileNotFoundError:
        index = layout.Index({}, {}, {}, {})
    texts: Texts = {}
    paths: Dict[str, str] = {}  # name -> where it is now
    for n, product in enumerate(task.products):
        name = layout.product_name(n)
        if index.kinds.get(name) is None or (only is not None and name not in only):
            continue  # not made: Snakemake reports missing outputs itself
        texts.update(_put(os.path.join(tmp, name), name, index, product.path))
        paths[name] = product.path
    if only is not None:
        return []
    return _targets(tmp, task, index, texts, paths)


def _put(src: str, name: str, index: layout.Index, dest: str, merge: bool = False) -> Texts:
    """Install the downloaded ``src`` (``name`` in ``index``) at ``dest``: by rename, or for a
    directory with ``merge``, entry by entry into what is there."""
    kind = index.kinds[name]
    if kind == "l":
        target = _link_target(src)
        install_link(target, dest)
        return {(name, "."): target}
    if kind == "d":
        os.makedirs(src, exist_ok=True)
        for sub in index.subdirs.get(name, []):
            os.makedirs(os.path.join(src, sub), exist_ok=True)
    made = restore(src, index.links.get(name, []), index.modes.get(name, {}))
    (merge_into if merge and kind == "d" else install)(src, dest)
    return {(name, sub): target for sub, target in made.items()}


def _targets(tmp: str, task: TaskSpec, index: layout.Index, texts: Texts, paths: Dict[str, str]) -> List[str]:
    warnings = []
    for owner, sub in index.outside:
        link, target = _link(owner, sub, texts, paths)
        if link is not None:
            warnings.append(f"output {link} is a link to {target}, which the job made outside the "
                            "workdir: only the link comes back")
    if not index.companions:
        return warnings
    guard = Guard(task)
    for owner, name, sub in index.companions:
        link, target = _link(owner, sub, texts, paths)
        if link is None or name not in index.kinds or name in paths:
            continue
        refused = guard.refuses(target)
        if refused is None and index.kinds[name] != "d" and os.path.isdir(target) \
                and not os.path.islink(target):
            refused = "a directory is there"
        if refused is not None:
            warnings.append(f"output {link} leads to {target}, which crank does not bring back ({refused})")
            continue
        texts.update(_put(os.path.join(tmp, name), name, index, target, merge=True))
        paths[name] = target
    return warnings


def _link(owner: str, sub: str, texts: Texts, paths: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """(the path of link ``sub`` of ``owner`` here, where its text leads), or (None, '')
    when the task named a link that did not come back."""
    text = texts.get((owner, sub))
    base = paths.get(owner)
    if text is None or base is None:
        return None, ""
    link = base if sub == "." else os.path.join(base, sub)
    return link, posixpath.normpath(os.path.join(os.path.dirname(link), text))


def restore(root: str, links: Sequence[str], modes: Mapping[str, int]) -> Dict[str, str]:
    """Turn the files standing for symlinks back into symlinks and give every file and
    directory its mode, below the downloaded product ``root``; the target text of each link
    made. The index comes from the task: nothing is changed through a symlink (a path whose
    real path is not itself) or outside ``root``; directories last, deepest first, so a
    read-only one is filled before."""
    root = os.path.realpath(root)

    def plain(sub: str, kind: int) -> Optional[str]:
        path = os.path.normpath(os.path.join(root, sub))
        try:
            is_kind = stat.S_IFMT(os.lstat(path).st_mode) == kind
        except OSError:
            return None
        return path if is_kind and os.path.realpath(path) == path else None

    directories = {sub: mode for sub, mode in modes.items() if plain(sub, stat.S_IFDIR)}
    for sub, mode in modes.items():
        path = plain(sub, stat.S_IFREG)
        if path and sub not in links:
            os.chmod(path, mode)
    made = {}
    for sub in links:
        path = plain(sub, stat.S_IFREG)
        if path:
            target = _link_target(path)
            os.unlink(path)
            os.symlink(target, path)
            made[sub] = target
    for sub in sorted(directories, key=lambda s: -s.count("/") - (s != ".")):
        path = plain(sub, stat.S_IFDIR)
        if path:
            os.chmod(path, directories[sub])
    return made


def _link_target(path: str) -> str:
    """The target text of a symlink the task sent as a file holding it."""
    with open(path, "rb") as f:
        return os.fsdecode(f.read())
