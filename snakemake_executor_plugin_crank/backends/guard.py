"""Where a symlink's target that a job made may be put on the client for it: a job's output
may be a link to something it made beside it, undeclared; the local executor leaves both.

The task is not trusted with where anything goes. A target is put only where the link's own
text leads: inside the workdir (not under ``.snakemake``), through no symlink, and never at or
in a product, at or in something crank put in place for the job (an input, a directory on the
way to one, a source), or at a directory holding one of them.
"""

from __future__ import annotations

import os
from typing import List, Optional, Set, Tuple

from ..errors import CrankError
from ..staging import tree
from ..task import TaskSpec
from .paths import under


class Guard:
    """Where a link's target may be installed for ``task`` (see the module's docstring)."""

    def __init__(self, task: TaskSpec):
        self.workdir = task.workdir
        self.products = [p.path for p in task.products]
        self._placed: Optional[Tuple[Set[str], Set[str]]] = None
        self._task = task

    def placed(self) -> Tuple[Set[str], Set[str]]:
        """(what crank put in place and the directories on the way, the directories it made
        whole), planned again from the task's inputs, as staging did."""
        if self._placed is None:
            task = self._task
            paths = [i.path for i in task.inputs if not i.url and os.path.lexists(i.path)]
            paths += [o.path for o in task.outputs if o.update and os.path.lexists(o.path)]
            planned = tree.plan(paths)
            exact = {e.path for e in planned.entries}
            exact |= {a.path for a in tree.ancestors(list(exact))}
            exact |= set(task.sources)
            for p in [*task.sources, *self.products]:
                exact.update(_parents(p))
            self._placed = exact, {e.path for e in planned.entries if e.kind == tree.DIR}
        return self._placed

    def refuses(self, target: str) -> Optional[str]:
        """Why ``target`` may not be installed, or None."""
        if not under(target, self.workdir) or target == self.workdir:
            return "outside the workdir"
        if under(target, os.path.join(self.workdir, ".snakemake")):
            return "under .snakemake"
        if any(under(target, p) or under(p, target) for p in self.products):
            return "an output"
        # the nearest directory on the way that exists: no symlink may lead the install elsewhere
        parent = os.path.dirname(target)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        real = os.path.join(os.path.realpath(self.workdir), os.path.relpath(parent, self.workdir))
        if os.path.realpath(parent) != os.path.normpath(real):
            return "reached through a symlink"
        try:
            exact, dirs = self.placed()
        except CrankError as e:
            return f"the inputs cannot be told: {e}"
        if target in exact or any(d in dirs for d in _parents(target)):
            return "crank put it there for the job"
        return None


def _parents(path: str) -> List[str]:
    found = []
    while path not in ("/", ""):
        path = os.path.dirname(path)
        found.append(path)
    return found
