"""Time stamps as engines and servers write them (RFC 3339, up to nanoseconds)."""

import re
from datetime import datetime
from typing import Optional


def parse(stamp: str) -> datetime:
    """An RFC 3339 time; digits past microseconds are dropped (datetime holds no more)."""
    stamp = stamp.replace("Z", "+00:00")
    whole, dot, rest = stamp.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        stamp = f"{whole}.{(digits + '000000')[:6]}{zone}"
    return datetime.fromisoformat(stamp)


def seconds_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    """``end - start`` in seconds; None when either is missing or not a time."""
    try:
        return (parse(end) - parse(start)).total_seconds()
    except (TypeError, ValueError, AttributeError):
        return None


def nanoseconds(stamp: str) -> int:
    """An RFC 3339 time as nanoseconds since the epoch, every digit kept."""
    whole, fraction, zone = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", stamp).groups()
    seconds = int(datetime.fromisoformat(whole + ("+00:00" if zone in (None, "Z") else zone)).timestamp())
    return seconds * 1_000_000_000 + int(((fraction or "") + "0" * 9)[:9])
