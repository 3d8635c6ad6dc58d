"""Saving a task's stdout and stderr where Snakemake can show them (aux logs)."""

from __future__ import annotations

import collections
import os
from typing import Iterable, Sequence, Tuple

from ..task import TaskSpec

TAIL_LINES = 20


def save_logs(
    task: TaskSpec, stdout: Iterable[bytes], stderr: Iterable[bytes]
) -> Tuple[Tuple[str, ...], str]:
    """Stream both logs to ``<log_dir>/<name>.stdout|.stderr``; return the files saved
    and the last lines of stderr. A log that cannot be written (disk full, no
    permission) is skipped, never an error: saving logs must not change a task's
    outcome. The stderr tail is kept either way; a note in it says what was not saved."""
    base = os.path.join(task.log_dir, task.name)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    pending = b""
    saved = []
    problems = []

    def stream(path, chunks, on_chunk=None):
        sink = None
        try:
            os.makedirs(task.log_dir, exist_ok=True)
            sink = open(path, "wb")
        except OSError as e:
            problems.append(f"{os.path.basename(path)}: {e.strerror or e}")
        try:
            for chunk in chunks:
                if on_chunk:
                    on_chunk(chunk)
                if sink is not None:
                    try:
                        sink.write(chunk)
                    except OSError as e:
                        problems.append(f"{os.path.basename(path)}: {e.strerror or e}")
                        sink = _close(sink)
                        _remove(path)  # no truncated log under the log's name
        finally:
            if sink is not None:
                try:
                    sink.close()
                    saved.append(path)
                except OSError as e:
                    problems.append(f"{os.path.basename(path)}: {e.strerror or e}")

    def keep_tail(chunk):
        nonlocal pending
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        tail.extend(lines)

    stream(base + ".stdout", stdout)
    stream(base + ".stderr", stderr, keep_tail)
    if pending:
        tail.append(pending)
    text = b"\n".join(tail).decode("utf-8", "replace")
    return tuple(saved), with_unsaved(text, problems)


def with_unsaved(tail: str, problems: Sequence[str]) -> str:
    """The stderr tail, with a note naming the logs that could not be saved."""
    if not problems:
        return tail
    return tail + ("\n" if tail else "") + "(crank could not save the log: " + "; ".join(problems) + ")"


def _close(sink):
    try:
        sink.close()
    except OSError:
        pass
    return None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass
