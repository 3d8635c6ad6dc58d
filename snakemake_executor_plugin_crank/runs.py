"""Which crank runs of a working directory are alive.

Snakemake lets two runs share a workdir when their outputs differ, so what start-up
removes as orphaned must be what a *dead* run left. Each run keeps a file
``.snakemake/crank/runs/<run id>`` while it runs, naming its process: pid, host name and
the process's start time (a pid reused by another process has another start time).

A run on another host (another node of a shared filesystem, or Snakemake in a container,
whose host name is new each time) cannot be checked from here: its liveness is a lease. A
live run touches its file every RENEW_S; a file of another host untouched for LEASE_S is a
dead run's. "Untouched" is judged by the filesystem's clock, not by ours: the file's mtime
is compared with that of a file made there just before, so that only a skew between the
hosts writing (never between their clocks and ours) beyond the lease could mislead.

A run whose process is gone, or whose lease lapsed, but whose file is still there ended
without cleaning up (killed, or detached): a later run may adopt its tasks, then removes its
file.

Imports nothing of crank's, nor Snakemake.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Mapping, Optional, Set, Tuple

RUNS_DIR = os.path.join(".snakemake", "crank", "runs")
# how often a live run touches its file, and how long another host's file may stay untouched
# before its run counts as dead (docs/reliability.md)
RENEW_S = 30
LEASE_S = 120

# a random id made once per workdir: see origin
ORIGIN = os.path.join(".snakemake", "crank", "origin")

# this process's run files -> what stops their renewal
_leases: dict = {}


def record(workdir: str, run_id: str) -> str:
    """Write this run's file, whole or not at all; return its path (``forget`` it at the end)."""
    directory = os.path.join(workdir, RUNS_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, run_id)
    pid = os.getpid()
    me = {"pid": pid, "host": socket.gethostname(), "started": process_start(pid)}
    partial = os.path.join(directory, f".{run_id}.partial")  # a dot: never read as a run
    try:
        with open(partial, "w") as f:
            json.dump(me, f)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    stop = _leases[path] = threading.Event()
    threading.Thread(target=_renew, args=(path, stop), daemon=True, name="crank-run-lease").start()
    return path


def _renew(path: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@functools.lru_cache(maxsize=16)
def origin(workdir: str) -> str:
    """What tells this workdir from another one at the same path: a random id made by the
    first run in it. Every host that sees the workdir on a shared filesystem reads the same
    id; two machines (cloud VMs, CI runners) with their own ``/home/ubuntu/proj`` make two.
    Tasks and containers carry it, and a run leaves those of another origin alone."""
    path = os.path.join(workdir, ORIGIN)
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            return f.read().strip()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    with open(partial, "w") as f:
        f.write(uuid.uuid4().hex + "\n")
    try:
        os.link(partial, path)  # whole or not at all; the first of two runs racing wins
    except FileExistsError:
        pass
    finally:
        os.unlink(partial)
    with open(path) as f:
        return f.read().strip()


def forget(path: str) -> None:
    """Remove a run file (this run's at its end, or a dead run's), ending its renewal."""
    if (stop := _leases.pop(path, None)) is not None:
        stop.set()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def survey(workdir: str) -> Tuple[Set[str], Set[str]]:
    """(live, dead): the ids of the workdir's runs whose process still runs (or runs on
    another host), and of those whose process is gone without the run having ended (it was
    killed, or detached from its tasks). A dead run's file stays until a later run has
    adopted or canceled what it left (``forget``); an unreadable file is dropped."""
    directory = os.path.join(workdir, RUNS_DIR)
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")]
    except FileNotFoundError:
        return set(), set()
    live, dead = set(), set()
    now = _filesystem_now(directory)
    for run_id in names:
        path = os.path.join(directory, run_id)
        try:
            with open(path) as f:
                owner = json.load(f)
                renewed = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            continue  # ended meanwhile
        except ValueError:
            owner = None  # not a run file of ours
        except OSError:
            live.add(run_id)  # e.g. another user's: cannot tell, so never touch its tasks
            continue
        if not isinstance(owner, dict):
            forget(path)
        elif alive(owner, now - renewed < LEASE_S):
            live.add(run_id)
        else:
            dead.add(run_id)
    return live, dead


def live_runs(workdir: str) -> Set[str]:
    return survey(workdir)[0]


def forget_run(workdir: str, run_id: str) -> None:
    forget(os.path.join(workdir, RUNS_DIR, run_id))


def _filesystem_now(directory: str) -> float:
    """The time as the filesystem holding the run files sets it (see the module text): that
    of a file made there and removed at once."""
    clock = os.path.join(directory, f".clock-{uuid.uuid4().hex}")
    try:
        with open(clock, "x"):
            pass
        try:
            return os.stat(clock).st_mtime
        finally:
            os.unlink(clock)
    except OSError:  # a directory we cannot write to: our clock is all there is
        return time.time()


def alive(owner: Mapping[str, Any], leased: bool) -> bool:
    """Whether the run a run file names still runs: its process, on this host; elsewhere,
    whether its lease holds (``leased``)."""
    if owner.get("host") != socket.gethostname():
        return leased
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    started = process_start(pid)
    if started is None:
        return _signalable(pid)  # no /proc entry: gone, or hidden from us (hidepid)
    return owner.get("started") in (None, started)


def process_start(pid: int) -> Optional[int]:
    """When the process started (clock ticks after boot: field 22 of /proc/<pid>/stat);
    None when /proc does not say (no such process, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after its end
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _signalable(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
