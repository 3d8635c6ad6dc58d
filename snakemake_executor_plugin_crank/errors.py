"""Errors meant for the user, and the message a failed task is reported with."""

from __future__ import annotations


class CrankError(Exception):
    """An error whose message is meant for the user as it is: one line, no traceback."""


class BackendUnavailable(CrankError):
    """The backend (engine, server or store) did not answer, or answered with a server
    error: a status round that meets it may be retried later."""
