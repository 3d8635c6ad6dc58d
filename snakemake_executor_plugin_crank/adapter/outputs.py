"""Around a job, for every backend: before it, stale outputs removed and parent
directories made (Snakemake's local executor does both itself, remote executors must);
after a job whose commands ran directly (no Snakemake in the image to do it), what
Snakemake's local executor does after a job, by Snakemake's own functions: benchmark
records, ``touch()`` outputs, missing logs created, the output checks (missing files,
``directory()`` type, ``ensure()``), ``protected()`` outputs write-protected, ``update()``
backups kept and restored.

Crank declares no shared filesystem (the TES backend has none), so Snakemake's main
process skips these steps (``Job.postprocess``): crank does them once the outputs are
back on the host (the TES backend downloads them in ``result()``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence

from snakemake.io import is_flagged

from ..errors import CrankError
from ..task import Launch, TaskSpec
from . import guarded
from .jobs import single_jobs


def prepare(job: Any, tasks: Sequence[TaskSpec], async_run: Callable,
            keep_outputs: bool = False) -> List[guarded.Kept]:
    """``tasks``: those that start now (a group's later jobs get their directories from
    ``make_parents`` when they start). Returns the update() outputs kept (put back if the
    job fails, ``restore``). ``keep_outputs``: the job's task was adopted from a dead run
    and may be writing them."""
    backed_up = []
    if tasks[0].launch is Launch.DIRECT:
        # as Job.prepare: an update() output stays, with a copy kept for a failure
        for single in single_jobs(job):
            for f in single.output:
                if is_flagged(f, "update") and os.path.lexists(f):
                    try:
                        backed_up.append(guarded.keep(str(f), tasks[0].workdir))
                    except (OSError, shutil.Error) as e:
                        for kept in backed_up:
                            guarded.drop(kept)
                        raise CrankError(
                            f"rule {job.rule.name}: cannot keep a copy of the update() output "
                            f"{str(f)!r} ({getattr(e, 'strerror', None) or e})") from None
    if keep_outputs:
        make_parents(tasks)
        return backed_up
    try:
        async_run(job.remove_existing_output())
    except OSError as e:
        # e.g. a path component of an output that is a file, not a directory
        raise CrankError(
            f"rule {job.rule.name}: cannot remove the old output {e.filename!r} "
            f"({e.strerror}); remove what is in the way"
        ) from None
    make_parents(tasks)
    return backed_up


def benchmark_places(tasks: Sequence[TaskSpec]) -> Dict[str, guarded.Place]:
    """Where the tasks' benchmark files go, noted before they run (see guarded)."""
    return {b: guarded.note(b) for t in tasks if t.launch is Launch.DIRECT for b in t.benchmarks}


def make_parents(tasks: Sequence[TaskSpec]) -> Sequence[TaskSpec]:
    """The directories of the tasks' outputs, logs and benchmark files, made as the local
    executor makes them when a job starts; returns the tasks."""
    for task in tasks:
        for product in task.products:
            parent = os.path.dirname(product.path)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise CrankError(
                    f"{task.label}: cannot create the directory {parent!r} for "
                    f"{product.path!r} ({e.strerror}); put the output in a writable "
                    "directory, or remove what is in the way"
                ) from None
    return tasks


def write_benchmark(job: Any, seconds: Sequence[Optional[float]], extended: bool,
                    places: Mapping[str, guarded.Place]) -> None:
    """The benchmark file in Snakemake's format: one record per repeat, with its running
    time (the other columns, measured by Snakemake around a local process, are NA);
    written where ``places`` noted it before the job (see guarded), never through a link."""
    from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

    records = []
    for running_time in seconds:
        record = BenchmarkRecord(running_time=running_time)
        record.process_gone = True  # nothing was sampled: NA without a warning
        # as run_wrapper does, for the extended format
        record.jobid = job.jobid
        record.rule_name = job.rule.name
        record.wildcards = job.wildcards
        record.params = job.params
        record.resources = job.resources
        record.input = job.input
        record.threads = job.threads
        records.append(record)
    path = os.path.abspath(str(job.benchmark))
    with tempfile.TemporaryDirectory(prefix="crank-benchmark-") as private:
        formatted = os.path.join(private, "benchmark")
        write_benchmark_records(records, formatted, extended)
        with open(formatted, "rb") as f:
            data = f.read()
    guarded.write(places.get(path) or guarded.note(path), data)


async def finish(job: Any, tasks: Sequence[TaskSpec],
                 seconds: Mapping[str, Optional[float]],
                 places: Mapping[str, guarded.Place],
                 in_storage: Collection[str] = ()) -> Optional[str]:
    """After the tasks of a job that ran directly succeeded: Snakemake's own steps after
    a job (``Job.postprocess`` with a shared filesystem). Returns why the job fails
    (an output check), or None. ``in_storage``: paths of outputs the backend stored
    itself, with no local copy (``storage.store_outputs`` checks them)."""
    dag = job.dag
    workflow = dag.workflow
    ignore: Any = False
    if job.is_group():
        # as GroupJob.postprocess: temp files nobody outside the group needs may be gone
        outside = lambda j, f: (
            f in dag.targetfiles
            or not is_flagged(f, "temp")
            or any(
                f in files
                for other, files in dag.depending[j].items()
                if not dag.finished(other) and dag.needrun(other) and other not in job.jobs
            )
        )
        ignore = [
            f for j in job.jobs for f in j.output
            if is_flagged(f, "nodelocal") or (is_flagged(f, "temp") and not outside(j, f))
        ]
    if in_storage:
        ignore = [*(ignore or []),
                  *(f for j in single_jobs(job) for f in j.output
                    if os.path.abspath(str(f)) in in_storage)]
    for single in single_jobs(job):
        own = [t for t in tasks if t.job_id == str(single.jobid)]
        if single.benchmark and own:
            try:
                write_benchmark(single, [seconds.get(t.name) for t in own],
                                workflow.output_settings.benchmark_extended, places)
            except OSError as e:
                return (f"rule {single.rule.name} (job {single.jobid}): cannot write its "
                        f"benchmark file {single.benchmark} ({e.strerror or e})")
        try:
            await _postprocess(single, ignore, workflow, grouped=job.is_group())
        except Exception as e:  # Snakemake's own message for the failed check
            text = str(e).strip() or type(e).__name__
            return f"rule {single.rule.name} (job {single.jobid}): {text}"
    return None


async def _postprocess(job: Any, ignore: Any, workflow: Any, grouped: bool) -> None:
    dag = job.dag
    dag.handle_touch(job)
    await dag.handle_log(job)
    await dag.check_and_touch_output(
        job,
        wait=workflow.execution_settings.latency_wait,
        ignore_missing_output=ignore,
        wait_for_local=True,
        # a group's members are touched level by level: no mtime check (as Snakemake)
        check_output_mtime=not grouped,
    )
    dag.handle_protected(job)


async def failed_logs(job: Any, tasks: Sequence[TaskSpec]) -> None:
    """The log files a failed job did not write are made empty, as Snakemake's local
    executor leaves them (its main process skips this for a remote job): those of the jobs
    whose tasks ran (a group's later jobs may never have started)."""
    started = {t.job_id for t in tasks}
    for single in single_jobs(job):
        if not job.is_group() or str(single.jobid) in started:
            await single.dag.handle_log(single)


def touch_member_outputs(single: Any) -> None:
    """What the local executor has done to a job's outputs before the next job starts,
    for a later member of a group to see: its ``touch()`` outputs exist, and its directory
    outputs hold their ``.snakemake_timestamp``. ``finish`` does it again (and says so)
    once the group has ended."""
    for f in single.output:
        if f in single.touch_output:
            f.touch_or_create()
        elif f.is_directory and os.path.isdir(f) and not os.path.islink(f):
            f.touch()


def missing_outputs(single: Any) -> List[str]:
    """The declared outputs a finished job did not leave (its ``touch()`` ones made):
    the local executor fails such a job before any job after it starts."""
    return [str(f) for f in single.output if not os.path.lexists(str(f))]


def consumed_temp(group: Any, single: Any, done: Collection[Any]) -> List[Any]:
    """The temp() files Snakemake's local executor removes once ``single``, a member of
    a group that crank runs job after job, has finished (``Dag.handle_temp``): its temp
    inputs and its own temp outputs that no job still to run needs. ``done``: the
    members finished so far. Snakemake's main process only removes them when the whole
    group has finished, so later members would still see them."""
    dag = group.dag
    if dag.workflow.storage_settings.notemp:
        return []
    finished = lambda j: j in done or dag.finished(j)

    def needed(producer: Any, f: Any) -> bool:
        return f in dag.derived_targetfiles or any(
            f in files
            for consumer, files in dag.depending[producer].items()
            if consumer is not producer and not finished(consumer) and dag.needrun(consumer)
        )

    found = [
        f
        for producer, files in dag.dependencies[single].items()
        for f in producer.output
        if is_flagged(f, "temp") and f in files and not needed(producer, f)
    ]
    if not single.is_checkpoint and (
        single not in dag.targetjobs or single.rule.name == dag.workflow.default_target
    ):
        found += [
            f for f in single.output
            if is_flagged(f, "temp") and f not in dag.targetfiles and not needed(single, f)
        ]
    return found


def remove_temp(files: Iterable[Any], info: Callable[[str], None],
                warn: Callable[[str], None]) -> None:
    """Remove temp files as Snakemake does, saying so with its words."""
    for f in files:
        path = str(f)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            else:
                continue
        except OSError as e:
            warn(f"crank: cannot remove temporary output {path} ({e.strerror})")
            continue
        info(f"Removing temporary output {path}.")


def restore(backed_up: Sequence[guarded.Kept], warn: Callable[[str], None]) -> None:
    """After a failed job (and Snakemake's removal of its outputs): update() outputs
    back as they were, as Snakemake does locally."""
    for kept in backed_up:
        try:
            guarded.put_back(kept)
        except (OSError, CrankError) as e:
            warn(f"crank: cannot put back the update() output {kept.place.path} "
                 f"({getattr(e, 'strerror', None) or e}); its old content is in {kept.copy}")


def forget(backed_up: Sequence[guarded.Kept]) -> None:
    """After a job that succeeded: the kept copies go."""
    for kept in backed_up:
        guarded.drop(kept)
