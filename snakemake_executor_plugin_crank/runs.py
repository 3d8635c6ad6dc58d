"""Which crank runs of a working directory are alive.

Snakemake lets two runs share a workdir when their outputs differ, so what start-up
removes as orphaned must be what a *dead* run left. Each run keeps a file
``.snakemake/crank/runs/<run id>`` while it runs, naming its process: pid, host name and
the process's start time (a pid reused by another process has another start time). A run
file written on another host is taken as alive: its process cannot be checked from here.
A run whose process is gone but whose file is still there ended without cleaning up
(killed, or detached): a later run may adopt its tasks, then removes its file.

Imports nothing of crank's, nor Snakemake.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Mapping, Optional, Set, Tuple

RUNS_DIR = os.path.join(".snakemake", "crank", "runs")


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
    return path


def forget(path: str) -> None:
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
    for run_id in names:
        path = os.path.join(directory, run_id)
        try:
            with open(path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            continue  # ended meanwhile
        except ValueError:
            owner = None  # not a run file of ours
        except OSError:
            live.add(run_id)  # e.g. another user's: cannot tell, so never touch its tasks
            continue
        if not isinstance(owner, dict):
            forget(path)
        elif alive(owner):
            live.add(run_id)
        else:
            dead.add(run_id)
    return live, dead


def live_runs(workdir: str) -> Set[str]:
    return survey(workdir)[0]


def forget_run(workdir: str, run_id: str) -> None:
    forget(os.path.join(workdir, RUNS_DIR, run_id))


def alive(owner: Mapping[str, Any]) -> bool:
    """Whether the process a run file names still runs."""
    if owner.get("host") != socket.gethostname():
        return True
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
