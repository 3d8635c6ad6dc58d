"""Saving a task's stdout and stderr where Snakemake can show them (aux logs)."""

from __future__ import annotations

import collections
import os
from typing import Iterable, Tuple

from ..task import TaskSpec

TAIL_LINES = 20


def save_logs(
    task: TaskSpec, stdout: Iterable[bytes], stderr: Iterable[bytes]
) -> Tuple[Tuple[str, ...], str]:
    """Stream both logs to ``<log_dir>/<name>.stdout|.stderr``; return the files and
    the last lines of stderr."""
    os.makedirs(task.log_dir, exist_ok=True)
    base = os.path.join(task.log_dir, task.name)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    pending = b""
    with open(base + ".stdout", "wb") as out:
        for chunk in stdout:
            out.write(chunk)
    with open(base + ".stderr", "wb") as err:
        for chunk in stderr:
            err.write(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            tail.extend(lines)
    if pending:
        tail.append(pending)
    text = b"\n".join(tail).decode("utf-8", "replace")
    return (base + ".stdout", base + ".stderr"), text
