"""The shell around a job in a Docker container: it checks that the container sees the
client's files, runs the job's command as its child, then kills what the job left running
and writes down what the container's cgroup counted (cgroup.py) into a file crank reads on
the host.

The check: crank writes a file with a fresh random name under the workdir (the probe)
before the run's first container; a container that does not find it at its path was given
another machine's directory of the same name (an engine on another host, or in other
mounts), and exits with NOT_SHARED before the job's command runs, leaving that machine's
files alone.

A runner (warm.py) reads its cgroup before the job too: the cgroup also holds what earlier
jobs used. The shell also restores SHLVL as the task's environment has it, so that the
job's own shell counts as the first (``environment`` moves a task's SHLVL aside for that).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Mapping, Sequence, Tuple

from .. import cgroup
from ..logs import open_job_file

# a waiting container's first process (a runner, the holder of the engine's copy of the
# workdir): waits forever, using only sh and sleep; ignoring SIGCHLD lets the kernel reap
# the processes that are left to it
IDLE = "trap '' CHLD; while :; do sleep 3600; done"
# more than a reading's few dozen lines: a file the job replaced is not read whole
READ_AT_MOST = 64 * 1024

NOT_SHARED = 209
NOT_SHARED_LINE = "crank: the container does not see the client's workdir (its probe file is missing)"
_PROBE = '[ -e "$crank_probe" ] || { echo "' + NOT_SHARED_LINE + '" >&2; exit ' + str(NOT_SHARED) + '; }; '
_SHLVL = 'if [ -n "${CRANK_SHLVL+x}" ]; then SHLVL=$CRANK_SHLVL; unset CRANK_SHLVL; else unset SHLVL; fi; '
_AFTER = (
    '"$@"; rc=$?; kill -9 -1 2>/dev/null; '
    '{ { echo ' + cgroup.SEPARATOR + '; crank_cg; } >>"$crank_u"; } 2>/dev/null; '
)

# a container of its own: $1 the probe, $2 the usage file, then the command
COLD = 'crank_probe=$1; crank_u=$2; shift 2; ' + _PROBE + _SHLVL + cgroup.FUNCTION + '; ' + _AFTER + 'exit $rc'

# an exec in a runner: $1 and $2 the stdout and stderr files, $3 the exit code's file (a
# later run that adopts the task reads it there: Docker forgets an exec when it restarts),
# $4 the probe, $5 the usage file, then the command
WARM = (
    'exec >"$1" 2>"$2"; crank_rc=$3; crank_probe=$4; crank_u=$5; shift 5; ' + _PROBE + _SHLVL
    + cgroup.FUNCTION + '; { crank_cg >"$crank_u"; } 2>/dev/null; ' + _AFTER
    + 'printf \'%s\\n\' "$rc" >"$crank_rc"; exit $rc'
)


def cold_argv(probe: str, usage_file: str, argv: Sequence[str]) -> Tuple[str, ...]:
    return ("/bin/sh", "-c", COLD, "crank", probe, usage_file, *argv)


def warm_argv(stdout: str, stderr: str, exit_file: str, probe: str, usage_file: str,
              argv: Sequence[str]) -> Tuple[str, ...]:
    return ("/bin/sh", "-c", WARM, "crank", stdout, stderr, exit_file, probe, usage_file, *argv)


def not_shared(exit_code, stderr_tail: str) -> bool:
    """Whether a container ended because it does not see the client's files."""
    return exit_code == NOT_SHARED and NOT_SHARED_LINE in stderr_tail


def not_shared_reason(engine: str, workdir: str) -> str:
    return (f"the job did not run: the Docker engine at {engine} does not see this machine's "
            f"{workdir} (a file crank wrote there is missing in the container). The engine runs "
            "on another machine or in other mounts, where a directory of that name holds other "
            "files; run crank with an engine on this machine, or use the TES backend")


def environment(env: Mapping[str, str]) -> Dict[str, str]:
    env = dict(env)
    if "SHLVL" in env:  # the wrapper's shell would count itself in it
        env["CRANK_SHLVL"] = env.pop("SHLVL")
    return env


def reading(usage_file: str) -> str:
    """What the shell wrote into the usage file, which is removed then ("" when missing)."""
    try:
        fd = open_job_file(usage_file)
    except OSError:
        return ""
    try:
        text = os.read(fd, READ_AT_MOST).decode(errors="replace")
    except OSError:
        text = ""
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(usage_file)
    return text
