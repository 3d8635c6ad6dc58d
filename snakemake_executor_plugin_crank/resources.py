"""Snakemake resources -> task resources, and fitting them to what a backend offers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

from .task import CrankError, Resources


@dataclass(frozen=True)
class Capacity:
    """What one task may get at most on a backend; None means no known limit."""

    cpus: Optional[int] = None
    mem_mb: Optional[int] = None
    gpus: Optional[int] = None


def _whole(what: str, name: str, value: Any, minimum: int) -> Optional[int]:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("<")):
        # "<TBD>": Snakemake leaves some resources to be decided on the remote side
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise CrankError(
            f"{what}: resource {name}={value!r} is not a number; give a whole number"
        ) from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise CrankError(
            f"{what}: resource {name}={value!r} must be a whole number >= {minimum}"
        )
    return int(number)


def from_snakemake(
    what: str, threads: Any, resources: Mapping[str, Any], preemptible: bool = False
) -> Resources:
    """Map a job's threads and resources (``mem_mb`` and ``disk_mb`` are decimal MB,
    ``runtime`` is minutes, ``gpu`` a device count) to task resources. ``what`` names
    the job in errors ("rule x")."""
    runtime_min = _whole(what, "runtime", resources.get("runtime"), 0)
    return Resources(
        cpus=_whole(what, "threads", threads, 1) or 1,
        mem_mb=_whole(what, "mem_mb", resources.get("mem_mb"), 1),
        disk_mb=_whole(what, "disk_mb", resources.get("disk_mb"), 1),
        runtime_s=runtime_min * 60 if runtime_min else None,
        gpus=_whole(what, "gpu", resources.get("gpu"), 0) or 0,
        preemptible=preemptible,
    )


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
