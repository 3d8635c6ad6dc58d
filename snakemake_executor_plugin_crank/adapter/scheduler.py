"""Snakemake's job scheduler beyond the plugin interface: its lock, which it holds while it
takes in finished jobs and updates the DAG (a checkpoint's end empties and refills the DAG's
sets of jobs). Where Snakemake is not as expected, nothing is held."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager


def lock(workflow: Any) -> ContextManager:
    """Held while the DAG is read from Snakemake's status thread."""
    held = getattr(getattr(workflow, "scheduler", None), "_lock", None)
    return held if held is not None and hasattr(held, "__enter__") else contextlib.nullcontext()
