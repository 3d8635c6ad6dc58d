"""What a failed object-store request means, in one line for the user."""

from __future__ import annotations

import re

from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

from ..errors import BackendUnavailable, CrankError


def explain(e: BaseException, doing: str, prefix: str, where: str, endpoint: str | None) -> CrankError:
    """One line for the user saying what failed (while ``doing``, at ``where`` under the
    store's ``prefix``) and what to do; never a credential."""
    text = str(e)
    code = _s3_code(text)
    status = _status(text)
    if code == "NoSuchBucket":
        return CrankError(f"{prefix}: bucket does not exist; create it or fix the storage prefix")
    if code == "InvalidAccessKeyId":
        return CrankError(f"{prefix}: the server does not know this access key; check AWS_ACCESS_KEY_ID")
    if code == "SignatureDoesNotMatch":
        return CrankError(f"{prefix}: the secret key was rejected; check AWS_SECRET_ACCESS_KEY")
    if "169.254.169.254" in text or "credential" in text.lower() and "metadata" in text.lower():
        return CrankError(
            f"{prefix}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or the store's own credential variables)"
        )
    if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
        return CrankError(
            f"{where}: access denied while {doing}{f' ({code})' if code else ''}; "
            "check the credentials and their permissions on this bucket"
        )
    if isinstance(e, FileNotFoundError):
        return CrankError(f"{where}: no such object")
    if isinstance(e, PermissionError):
        return CrankError(f"{where}: permission denied while {doing}")
    if isinstance(e, OSError) and not isinstance(e, BaseError):
        return CrankError(f"{where}: {doing} failed: {e.strerror or e}")
    if status is not None and status >= 500 or _is_transport(text):
        at = f" at {endpoint}" if endpoint else ""
        return BackendUnavailable(
            f"{prefix}: store{at} unreachable or failing while {doing} "
            f"({_transport_reason(text, status)}), after retries; is it running?"
        )
    return CrankError(f"{where}: {doing} failed: {first_line(text)}")


def first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]


def _s3_code(text: str) -> str | None:
    m = re.search(r"<Code>([A-Za-z]+)</Code>", text)
    return m.group(1) if m else None


def _status(text: str) -> int | None:
    m = re.search(r"status code: (\d{3})|status: (\d{3})", text)
    return int(m.group(1) or m.group(2)) if m else None


_TRANSPORT = ("error sending request", "connection refused", "connect", "timed out", "timeout",
              "dns error", "broken pipe", "connection reset")


def _is_transport(text: str) -> bool:
    low = text.lower()
    return any(t in low for t in _TRANSPORT)


def _transport_reason(text: str, status: int | None) -> str:
    if status is not None and status >= 500:
        return f"HTTP {status}"
    low = text.lower()
    for reason in ("connection refused", "timed out", "dns error", "connection reset"):
        if reason in low:
            return reason
    return "cannot connect"
