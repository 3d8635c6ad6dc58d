"""Snakemake's threads and resources -> task resources."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from ..errors import CrankError
from ..task import Resources


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
