"""Snakemake resources -> task resources, and fitting them to what a backend offers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

from .task import CrankError, Resources


@dataclass(frozen=True)
class Capacity:
    """What one task may get at most on a backend; None means no known limit."""

    cpus: Optional[int] = None
    mem_mb: Optional[int] = None
    gpus: Optional[int] = None


def _whole(rule: str, name: str, value: Any, minimum: int) -> Optional[int]:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("<")):
        # "<TBD>": Snakemake leaves some resources to be decided on the remote side
        return None
    if isinstance(value, bool):
        raise CrankError(f"rule {rule}: resource {name}={value!r} is not a number; give a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CrankError(
            f"rule {rule}: resource {name}={value!r} is not a number; give a whole number"
        ) from None
    if number != int(number) or number < minimum:
        raise CrankError(
            f"rule {rule}: resource {name}={value!r} must be a whole number >= {minimum}"
        )
    return int(number)


def from_snakemake(
    rule: str, threads: Any, resources: Mapping[str, Any], preemptible: bool = False
) -> Resources:
    """Map a job's threads and resources (``mem_mb`` and ``disk_mb`` are decimal MB,
    ``runtime`` is minutes, ``gpu`` a device count) to task resources."""
    runtime_min = _whole(rule, "runtime", resources.get("runtime"), 0)
    return Resources(
        cpus=_whole(rule, "threads", threads, 1) or 1,
        mem_mb=_whole(rule, "mem_mb", resources.get("mem_mb"), 1),
        disk_mb=_whole(rule, "disk_mb", resources.get("disk_mb"), 1),
        runtime_s=runtime_min * 60 if runtime_min else None,
        gpus=_whole(rule, "gpu", resources.get("gpu"), 0) or 0,
        preemptible=preemptible,
    )


def fit(
    rule: str, wanted: Resources, capacity: Capacity, clamp: bool
) -> Tuple[Resources, List[str]]:
    """Return the resources to use and the warnings to print.

    A request above the capacity is an error unless ``clamp`` is set, in which case
    it is lowered to the capacity and a warning says so.
    """
    changes = {}
    warnings = []
    for name, unit in (("cpus", "CPUs"), ("mem_mb", "MB of memory"), ("gpus", "GPUs")):
        want = getattr(wanted, name)
        have = getattr(capacity, name)
        if want is None or have is None or want <= have:
            continue
        asked = {"cpus": "threads", "mem_mb": "mem_mb", "gpus": "gpu"}[name]
        if not clamp:
            raise CrankError(
                f"rule {rule} asks for {asked}={want} but the backend offers at most {have} "
                f"{unit}; lower the request or set --crank-clamp-resources"
            )
        changes[name] = have
        warnings.append(f"rule {rule}: {asked}={want} lowered to {have} ({unit} available)")
    if changes.get("gpus") == 0 and wanted.gpus:
        raise CrankError(f"rule {rule} asks for gpu={wanted.gpus} but the backend has no GPU")
    return dataclasses.replace(wanted, **changes), warnings
