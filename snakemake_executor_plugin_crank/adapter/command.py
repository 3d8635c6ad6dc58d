"""The exact command Snakemake would execute for a ``shell:`` rule.

``job.shellcmd`` is the form Snakemake *displays*: formatted with the main workflow's
names, ``name`` meaning the rule, ``{resources.tmpdir}`` unresolved, and without the
workflow's ``shell.prefix``/``shell.suffix``/``shell.executable``. Instead, the rule's own
generated function (the one Snakemake's local executor calls) is called here, on the host,
with Snakemake's ``shell`` replaced by a recorder: the command is formatted by Snakemake's
own ``format`` in the rule's module namespace (modules, ``use rule ... from ...``, module
config, ``--config``), and the recorder applies prefix, suffix and executable the way
``snakemake.shell.shell`` does, then returns instead of running anything.

Everything here reads Snakemake internals (``rule.run_func``, ``shell``'s class state):
this module is the one place to fix when Snakemake changes them.
"""

from __future__ import annotations

import inspect
import os
import shlex
import types
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional

from ..errors import CrankError

# the kernel's limit for one argument (MAX_ARG_STRLEN, 32 pages)
MAX_ARG_LEN = 32 * 4096 - 1

# undoes the launcher's strict mode when the workflow's shell is not strict locally
# (a shell.prefix of its own replaces Snakemake's default "set -euo pipefail; ")
NOT_STRICT = "set +eu; if (set +o pipefail) 2>/dev/null; then set +o pipefail; fi; "


class NotPlainShell(Exception):
    """The rule's function does not make exactly one shell call."""


@dataclass(frozen=True)
class Recorded:
    """One shell call as Snakemake would run it."""

    command: str  # formatted, with prefix and suffix
    executable: Optional[str]  # the shell Snakemake would start it with


def _recorder(calls: List[Recorded]):
    from snakemake.common import RULEFUNC_CONTEXT_MARKER
    from snakemake.shell import shell
    from snakemake.utils import format as sm_format

    class recording_shell:
        """Stands in for ``snakemake.shell.shell`` in the rule's function: formats the
        command exactly as ``shell.__new__`` does, records it, runs nothing."""

        def __new__(cls, cmd, *args, iterable=False, read=False, bench_record=None, **kwargs):
            if "stepout" in kwargs:
                raise KeyError("Argument stepout is not allowed in shell command.")
            # stepout=2: the names of the rule function's frame and its module's globals
            cmd = sm_format(cmd, *args, stepout=2, **kwargs)
            caller = inspect.currentframe().f_back.f_locals
            context = dict(caller) if caller.get(RULEFUNC_CONTEXT_MARKER) else {}
            context.update(kwargs)
            resources = context.get("resources", {})
            executable = resources.get("shell_exec") or shell.get_executable()
            command = " ".join(
                (shell._get_process_prefix(executable), cmd, shell._process_suffix)
            ).strip()
            calls.append(Recorded(command, executable))
            return None

    return recording_shell


def _call_args(job: Any, tmpdir: str, threads: int, bench_iteration: Optional[int]) -> tuple:
    """The arguments Snakemake's local executor passes to a rule's function
    (``LocalExecutor.job_args_and_prepare`` / ``run_wrapper``), for a command that runs
    in a container: no conda, no Apptainer, no shadow directory, and the tmpdir and
    threads the container has."""
    from snakemake.iocontainers import ResourceList

    workflow = job.rule.workflow
    values = {name: job.resources[name] for name in job.resources.keys()}
    values["tmpdir"] = tmpdir
    resources = ResourceList(fromdict=values)
    return (
        job.input._plainstrings(),
        job.output._plainstrings(),
        job.params,
        job.wildcards,
        threads,
        resources,
        job.log._plainstrings(),
        job.rule.name,  # rule
        None,  # conda_env
        None,  # container_img
        "",  # singularity_args
        False,  # use_singularity
        None,  # env_modules
        None,  # bench_record
        job.jobid,
        True,  # is_shell
        bench_iteration,
        True,  # cleanup_scripts
        None,  # shadow_dir
        None,  # edit_notebook
        getattr(workflow, "conda_base_path", None),
        job.rule.basedir,
        workflow.sourcecache.cache_path,
        workflow.sourcecache.runtime_cache_path,
        getattr(workflow, "runtime_paths", None),
    )


def record(
    job: Any, tmpdir: str, threads: int, bench_iteration: Optional[int] = None
) -> Recorded:
    """Call the rule's generated function with ``shell`` recorded. ``threads`` is the
    job's threads capped at the backend's CPUs, as the local executor caps them at
    ``--cores``. Raises NotPlainShell when it does not make exactly one shell call,
    CrankError when formatting fails."""
    func = job.rule.run_func
    if func is None or job.rule.shellcmd is None:
        raise NotPlainShell()
    calls: List[Recorded] = []
    namespace = dict(func.__globals__)  # the rule's module namespace, not the main one
    namespace["shell"] = _recorder(calls)
    recording = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    recording.__kwdefaults__ = func.__kwdefaults__
    args = _call_args(job, tmpdir, threads, bench_iteration)
    try:
        recording(*args)
    except NotPlainShell:
        raise
    except Exception as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise CrankError(f"rule {job.rule.name}: cannot format the shell command: {message}") from None
    if len(calls) != 1:
        raise NotPlainShell()
    return calls[0]


def _is_bash(executable: Optional[str]) -> bool:
    return bool(executable) and os.path.basename(executable).lower() == "bash"


def script_for(recorded: Recorded) -> str:
    """The text crank's launcher runs (bash -euo pipefail when the image has bash, else
    sh -eu with pipefail) so that it behaves as Snakemake's ``shell`` locally."""
    from snakemake.shell import shell

    command = recorded.command
    if _is_bash(recorded.executable) or not recorded.executable:
        # locally: bash -c "<prefix> cmd <suffix>"; Snakemake's default prefix is
        # the launcher's strict mode, a prefix of the workflow's own is not strict
        if shell._process_prefix is not None:
            return NOT_STRICT + command
        return command
    # another shell (shell.executable or the shell_exec resource): run it, as Snakemake
    # does; Snakemake made its path absolute on the host, the image may keep it elsewhere
    exe = shlex.quote(recorded.executable)
    base = shlex.quote(os.path.basename(recorded.executable))
    missing = shlex.quote(
        f"crank: the image has no {recorded.executable} nor "
        f"{os.path.basename(recorded.executable)} on its PATH (the workflow's shell executable)"
    )
    find = (
        f"if [ -x {exe} ]; then crank_shell={exe}; "
        f"elif crank_shell=$(command -v {base}); then :; "
        f"else echo {missing} >&2; exit 127; fi\n"
    )
    if len(command) + 2 <= MAX_ARG_LEN:
        return find + f'exec "$crank_shell" -c {shlex.quote(command)}\n'
    # too long for one argument: a script file, as Snakemake does for long commands
    mark = f"CRANK_EOF_{uuid.uuid4().hex}"
    return (
        find
        + "crank_script=$(mktemp)\n"
        + f"cat > \"$crank_script\" <<'{mark}'\n{command}\n{mark}\n"
        + 'exec "$crank_shell" "$crank_script"\n'
    )
