"""What a container's cgroup counted for a job, read inside the container by the shell
that runs the job, and turned into a ``Usage``.

The shell reads its own cgroup's files (v2: ``memory.peak``, ``cpu.stat``, ``io.stat``; v1:
the memory, cpuacct and blkio controllers) with shell builtins only, so that reading costs
no process. Each line it writes is the file's name, a space, and one line of that file.
A reading taken before the job (a warm runner's cgroup also holds what earlier jobs used)
is followed by a line ``--`` and the reading after it; a container that ran only the job
writes the ``--`` line and the reading after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

from ..task import Usage

FILES = (
    "memory.peak", "memory/memory.max_usage_in_bytes", "cpuacct/cpuacct.usage",
    "cpu.stat", "io.stat", "blkio/blkio.throttle.io_service_bytes",
    "memory.events", "memory/memory.oom_control",  # oom_kill: what the OOM killer took
)
# the shell function writing one reading to stdout (dash, bash and busybox sh have these builtins)
FUNCTION = (
    "crank_cg() { for f in " + " ".join(FILES) + "; do "
    '[ -r "/sys/fs/cgroup/$f" ] || continue; '
    'while read -r l; do printf \'%s %s\\n\' "$f" "$l"; done < "/sys/fs/cgroup/$f"; '
    "done; }"
)
SEPARATOR = "--"


@dataclass(frozen=True)
class Counters:
    peak: Optional[int] = None  # bytes, the most the cgroup held in its life
    cpu_ns: Optional[int] = None
    read: Optional[int] = None  # bytes
    written: Optional[int] = None
    oom_kills: Optional[int] = None


def usage(text: str, queue_s: Optional[float] = None) -> Usage:
    """The job's usage from what the shell wrote (see the module text). A figure the cgroup
    does not give, or cannot give for this job alone, is None: a warm runner's peak memory
    belongs to its whole life, so a job that did not raise it has no peak of its own."""
    before_text, separated, after_text = text.rpartition("\n" + SEPARATOR + "\n")
    if not separated:
        if not text.startswith(SEPARATOR + "\n"):
            return Usage(queue_s=queue_s)  # no reading after the job: it was killed
        before_text, after_text = "", text.removeprefix(SEPARATOR + "\n")
    after = counters(after_text.splitlines())
    if after.cpu_ns is None:
        return Usage(queue_s=queue_s)
    before = counters(before_text.splitlines()) if before_text else Counters(cpu_ns=0, read=0, written=0)

    def spent(a: Optional[int], b: Optional[int]) -> Optional[int]:
        return None if a is None or b is None else max(0, a - b)

    peak = after.peak
    if peak is not None and before.peak is not None and peak <= before.peak:
        peak = None
    mb = lambda n: None if n is None else n / 1e6  # noqa: E731
    # a cgroup that counts no block device read or wrote nothing
    return Usage(
        queue_s=queue_s, cpu_s=spent(after.cpu_ns, before.cpu_ns) / 1e9, peak_mb=mb(peak),
        read_mb=mb(spent(after.read or 0, before.read or 0)),
        written_mb=mb(spent(after.written or 0, before.written or 0)),
    )


def oom_killed(text: str) -> bool:
    """Whether the OOM killer took a process of the job (what the shell wrote: see the
    module text). Docker's own flag for it misses a child killed while the container lives
    on, now and then."""
    before_text, separated, after_text = text.rpartition("\n" + SEPARATOR + "\n")
    if not separated:
        before_text, after_text = "", text.removeprefix(SEPARATOR + "\n")
    after = counters(after_text.splitlines()).oom_kills
    before = counters(before_text.splitlines()).oom_kills or 0
    return after is not None and after > before


def counters(lines: Iterable[str]) -> Counters:
    """One reading's figures."""
    found: Dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(" ")
        fields = rest.split()
        if name in ("memory.peak", "memory/memory.max_usage_in_bytes") and _digits(fields, 1):
            found["peak"] = int(fields[0])
        elif name in ("memory.events", "memory/memory.oom_control") and len(fields) == 2 \
                and fields[0] == "oom_kill" and fields[1].isdigit():
            found["oom_kills"] = int(fields[1])
        elif name == "cpuacct/cpuacct.usage" and _digits(fields, 1):
            found["cpu_ns"] = int(fields[0])
        elif name == "cpu.stat" and len(fields) == 2 and fields[0] == "usage_usec" and fields[1].isdigit():
            found["cpu_ns"] = int(fields[1]) * 1000
        elif name == "io.stat" and fields:  # MAJ:MIN rbytes=N wbytes=N ...
            counts = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
            for key, field in (("read", "rbytes"), ("written", "wbytes")):
                if counts.get(field, "").isdigit():
                    found[key] = found.get(key, 0) + int(counts[field])
        elif name == "blkio/blkio.throttle.io_service_bytes" and len(fields) == 3 and fields[2].isdigit():
            key = {"Read": "read", "Write": "written"}.get(fields[1])  # MAJ:MIN Read N
            if key and ":" in fields[0]:
                found[key] = found.get(key, 0) + int(fields[2])
    return Counters(**found)


def _digits(fields, count: int) -> bool:
    return len(fields) == count and all(f.isdigit() for f in fields)
