"""Around a job, for every backend: before it, stale outputs removed and parent
directories made (Snakemake's local executor does both itself, remote executors must);
after it, the benchmark file of a command that ran directly."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from ..errors import CrankError
from ..task import TaskSpec


def prepare(job: Any, tasks: Sequence[TaskSpec], async_run: Callable) -> None:
    async_run(job.remove_existing_output())
    for task in tasks:
        for product in task.products:
            parent = os.path.dirname(product.path)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise CrankError(
                    f"{task.label}: cannot create the directory {parent!r} for "
                    f"{product.path!r} ({e.strerror})"
                ) from None


def write_benchmark(path: str, seconds: Optional[float]) -> None:
    """A benchmark file in Snakemake's format with the running time (the other columns,
    measured by Snakemake around a local process, are NA)."""
    from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

    record = BenchmarkRecord(running_time=seconds)
    record.process_gone = True  # nothing was sampled: NA without a warning
    write_benchmark_records([record], path, extended_fmt=False)
