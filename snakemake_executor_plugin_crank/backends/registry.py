"""The backends by name, as ``--crank-backend`` chooses them. Each is a package under
``backends/`` whose ``opening`` module says how it is opened from crank's settings and what
it can do (read by the executor, which knows no backend by name):

    UNIT                  what a task is called on the backend, in messages
    SERVER_STORES_URLS    whether the server fetches and stores storage() objects itself
                          (they then go into tasks as URLs instead of being staged by crank)
    check(settings)       its settings checked together; CrankError names the first wrong one
    open_backend(settings, run_id, workdir, report)   the backend, checked to answer
    image_hint(settings)  what to do about an image the backend cannot have

A new backend is its package and one line here (and its options among crank's settings)."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = {
    "docker": ".docker.opening",
    "tes": ".tes.opening",
}


def kind(name: str) -> ModuleType:
    """The ``opening`` module of the backend called ``name`` (one of BACKENDS)."""
    return importlib.import_module(BACKENDS[name], __package__)
