"""Errors meant for the user, and the message a failed task is reported with."""

from __future__ import annotations

from .task import TaskResult, TaskSpec


class CrankError(Exception):
    """An error whose message is meant for the user as it is: one line, no traceback."""


class BackendUnavailable(CrankError):
    """The backend (engine, server or store) did not answer, or answered with a server
    error: what met it may be tried again later."""


class NotYet(Exception):
    """The task cannot start yet (its image is being pulled): ask again at the next round.
    Not a failure: the runner's tolerance clock does not run for it."""


class ImageUnavailable(CrankError):
    """The task's image cannot be had; the adapter says where the image came from."""


def failure_message(task: TaskSpec, result: TaskResult) -> str:
    what = f"{task.label} (job {task.job_id}, attempt {task.attempt}) failed in image {task.image}"
    details = []
    if result.exit_code is not None:
        details.append(f"exit code {result.exit_code}")
    if result.reason:
        details.append(result.reason)
    message = what + (": " + "; ".join(details) if details else "")
    if result.stderr_tail.strip():
        message += "\nlast lines of stderr:\n" + result.stderr_tail.rstrip()
    return message
