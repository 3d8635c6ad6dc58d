"""Fitting a task's resources to what a backend offers."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from .errors import CrankError
from .task import Capacity, Resources


def fit(
    what: str,
    wanted: Resources,
    capacity: Capacity,
    clamp: bool,
    mem_mb_per_cpu: Optional[int] = None,
) -> Tuple[Resources, List[str]]:
    """Return the resources to use and the warnings to print.

    More CPUs than the backend has: the task runs with what it has, with a warning, as
    Snakemake's local executor caps a rule's threads at ``--cores``. The warning reads the
    same for every job of a rule with the same request, so it is printed once per rule.
    Memory given per CPU (``mem_mb_per_cpu``) follows the CPUs the task gets. More memory
    or GPUs than the backend has: an error, unless ``clamp`` is set, in which case the
    request is lowered to the capacity with a warning.
    """
    changes = {}
    warnings = []
    if capacity.cpus is not None and wanted.cpus > capacity.cpus:
        changes["cpus"] = capacity.cpus
        warnings.append(
            f"{what} asks for {wanted.cpus} CPUs (threads), more than the {capacity.cpus} the "
            f"backend has: its jobs run on {capacity.cpus} CPUs (and, unless --cores is given, "
            f"with {{threads}} = {capacity.cpus}, as Snakemake caps threads at --cores)"
        )
        if mem_mb_per_cpu:
            changes["mem_mb"] = mem_mb_per_cpu * capacity.cpus
    mem_mb = changes.get("mem_mb", wanted.mem_mb)
    for name, asked, want, unit in (
        ("mem_mb", "mem_mb", mem_mb, "MB of memory"),
        ("gpus", "gpu", wanted.gpus, "GPUs"),
    ):
        have = getattr(capacity, name)
        if want is None or have is None or want <= have:
            continue
        if name == "gpus" and have == 0:
            raise CrankError(f"{what} asks for gpu={want} but the backend has no GPU")
        if not clamp:
            raise CrankError(
                f"{what} asks for {asked}={want} but the backend offers at most {have} "
                f"{unit}; lower the request or set --crank-clamp-resources"
            )
        changes[name] = have
        warnings.append(f"{what}: {asked}={want} lowered to {have} ({unit} available)")
    return dataclasses.replace(wanted, **changes), warnings
