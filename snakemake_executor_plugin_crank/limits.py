"""Fitting a task's resources to what a backend offers."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

from .errors import CrankError
from .task import Capacity, Resources


def fit(
    what: str, wanted: Resources, capacity: Capacity, clamp: bool
) -> Tuple[Resources, List[str]]:
    """Return the resources to use and the warnings to print.

    A request above the capacity is an error unless ``clamp`` is set, in which case
    it is lowered to the capacity and a warning says so.
    """
    changes = {}
    warnings = []
    limits = (("cpus", "threads", "CPUs"), ("mem_mb", "mem_mb", "MB of memory"), ("gpus", "gpu", "GPUs"))
    for name, asked, unit in limits:
        want = getattr(wanted, name)
        have = getattr(capacity, name)
        if want is None or have is None or want <= have:
            continue
        if not clamp:
            raise CrankError(
                f"{what} asks for {asked}={want} but the backend offers at most {have} "
                f"{unit}; lower the request or set --crank-clamp-resources"
            )
        changes[name] = have
        warnings.append(f"{what}: {asked}={want} lowered to {have} ({unit} available)")
    if changes.get("gpus") == 0 and wanted.gpus:
        raise CrankError(f"{what} asks for gpu={wanted.gpus} but the backend has no GPU")
    return dataclasses.replace(wanted, **changes), warnings
