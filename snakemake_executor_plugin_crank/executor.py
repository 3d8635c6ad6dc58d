"""Snakemake's RemoteExecutor glue: jobs in, tasks through the status rounds, outcomes out."""

from __future__ import annotations

import os
import time
import uuid
from typing import AsyncGenerator, Dict, List, Optional, Tuple

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from . import runs
from .adapter import group_runs, groups, jobs, outputs, scheduler, storage
from .adapter.group_runs import Ended, Flight, GroupRuns
from .adapter.record import JobRecord
from .adapter.trace import Trace
from .backends import registry
from .errors import CrankError, ImageUnavailable
from .rounds import Chain, Outcome, RoundFailed, Rounds
from .settings import ExecutorSettings, backend_from, image_message
from .task import Adopted

IDLE_INTERVAL = 0.1


def _label(job) -> str:
    return f"group {job.groupid}" if job.is_group() else f"rule {job.rule.name}"


class Executor(RemoteExecutor):
    # read by status rounds, which can begin before __post_init__ has run
    _canceling = False
    _orphans_kept = 0
    _detached = False

    def __post_init__(self):
        self.settings = self.workflow.executor_settings or ExecutorSettings()
        self.run_id = uuid.uuid4().hex
        workdir = self._workdir = os.getcwd()
        kind = registry.kind(self.settings.backend)
        self._unit = kind.UNIT  # what a task is called on the backend, in messages
        self._trace = Trace(workdir, self.run_id, self.settings.backend)
        # before anything is submitted, so that another run starting now leaves ours alone
        self._run_file = runs.record(workdir, self.run_id)
        try:
            self.backend = backend_from(
                self.settings, self.run_id, workdir, lambda line: self.logger.info(f"crank: {line}")
            )
            # other runs of this workdir that are alive keep their tasks; those of runs
            # that were killed are adopted by jobs asking for their work (docs/reliability.md)
            live, self._dead_runs = runs.survey(workdir)
            removed, kept = self.backend.gather_orphans(live, self._dead_runs)
        except CrankError as e:
            runs.forget(self._run_file)
            raise WorkflowError(str(e)) from None
        if removed:
            self.logger.info(f"crank: removed {removed} {self._unit}(s) left by an earlier run")
        # the single jobs handed to run_job: once every job to run is among them, no
        # later job can adopt what is left
        self._submitted = set()
        self._orphans_kept = kept  # last: a status round may already run
        if kept:
            self.logger.info(
                f"crank: an earlier run in this directory ended without its {kept} "
                f"{self._unit}(s); jobs that ask for the same work adopt them, the rest are "
                "canceled (if Snakemake asks for it, run again with --rerun-incomplete)"
            )
        remote = self.workflow.remote_execution_settings
        self.rounds = Rounds(
            self.backend,
            preemptible_retries=remote.preemptible_retries or 0,
            tolerance_s=self.settings.backend_tolerance,
        )
        # Ctrl-C or shutdown: crank removes the tasks itself, no round reports them
        self._canceling = False
        # jobs reported failed because the backend stayed unreachable, and whether their
        # tasks were confirmed removed (docs/reliability.md)
        self._given_up: List[Tuple[JobExecutorInterface, bool]] = []
        self._group_runs = GroupRuns()  # a group job submitted again (group_runs.py)
        self._group_reported: Optional[Flight] = None  # the last group whose outcome was reported
        self._warned = set()
        self._noted = {}
        # jobs reported failed whose update() outputs come back once Snakemake has removed
        # their outputs: Snakemake names only the job in handle_job_error
        self._to_restore: Dict[JobExecutorInterface, JobRecord] = {}
        self.context = jobs.JobContext(
            workdir=workdir,
            log_dir=os.path.join(workdir, ".snakemake", "crank", "logs", self.run_id),
            default_image=self.settings.default_image or remote.container_image,
            snakemake_image=remote.container_image,
            snakemake_version=jobs.snakemake_version(),
            job_command=self.format_job_exec,
            sources=jobs.workflow_sources(self.workflow),
            use_conda=DeploymentMethod.CONDA
            in self.workflow.deployment_settings.deployment_method,
            # storage plugins' secrets only go to tasks that run Snakemake and need them
            envvars=storage.user_envvars(self.envvars(), self.workflow),
            storage_env=lambda job: storage.secrets_for(job, self.workflow),
            storage_plugins=storage.packages(self.workflow),
            **(
                # objects the TES server fetches or stores itself go into the task as URLs
                {
                    "input_urls": storage.server_fetchable(
                        self.settings.storage_prefix, self.settings.storage_endpoint
                    ),
                    "output_urls": self._server_writable(),
                }
                if kind.SERVER_STORES_URLS else {}
            ),
            is_preemptible=remote.preemptible_rules.is_preemptible,
            capacity=self.backend.capacity(),
            clamp=self.settings.clamp_resources,
            warn=self._warn_once,
            note=self._note,
            envmodules=self.settings.envmodules,
            # RemoteExecutor.cores: "all" when the user gave no --cores (only --jobs)
            cores=None if self.cores == "all" else self.cores,
        )
        self._note(jobs.IGNORED_NOTE, jobs.ignored_resources(self.workflow))

    def _server_writable(self):
        """job -> the storage outputs the TES server stores itself: not those of a job
        whose outputs go to the between-workflow cache, which takes them from local copies."""
        writable = storage.server_writable(
            self.settings.storage_prefix, self.settings.storage_endpoint
        )
        return lambda job: {} if storage.cacheable(job, self.workflow) else writable(job)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.logger.warning(f"crank: {message}")

    def _note(self, topic: str, names) -> None:
        """One line per run for a topic: only names not reported before are printed."""
        seen = self._noted.setdefault(topic, set())
        new = sorted(set(names) - seen)
        if new:
            seen.update(new)
            self.logger.warning(f"crank: {topic}: {', '.join(new)}")

    def format_job_exec(self, job: JobExecutorInterface) -> str:
        # Snakemake's command names every installed storage plugin's settings
        return storage.job_command(super().format_job_exec(job), self.workflow)

    def run_job(self, job: JobExecutorInterface):
        record = JobRecord(job, info=self.logger.info, warn=self.logger.warning)
        info = SubmittedJobInfo(job, aux={"record": record})
        try:
            self._hand_over(job, record, info)
        finally:
            # only now: a status round (Snakemake's own thread) that saw the job counted
            # before its adoption would cancel the task it is about to adopt
            if self._orphans_kept:
                self._submitted.update(jobs.single_jobs(job))

    def _hand_over(self, job: JobExecutorInterface, record: JobRecord, info: SubmittedJobInfo) -> None:
        # Snakemake submits a group again when a checkpoint's end updates the DAG while it
        # runs (group_runs.py)
        if self._group_runs.ran_object(job) and group_runs.merge_twin(self.workflow, job):
            self.logger.info(f"crank: group {job.groupid} was submitted again as it ran; it ends once")
            return
        leader = self._group_runs.ran(job)
        if leader is not None:
            self.logger.info(f"crank: group {job.groupid} was submitted again after its jobs ran; "
                             "it ends as they did")
        else:
            leader = self._group_runs.in_flight(job)
            if leader is not None:
                self.logger.info(f"crank: group {job.groupid} was submitted again while it runs; "
                                 "it ends as the run in flight does")
        if leader is not None:
            self.report_job_submission(SubmittedJobInfo(job, external_jobid=leader.handle,
                                                         aux={"follows": leader}))
            return
        try:
            if self._from_cache(job):
                return
            tasks = jobs.tasks_for(job, self.context)
            record.launch = tasks[0].launch
            if record.direct and storage.storage_files(job):
                # no Snakemake in the image retrieves them: the host does, as locally
                self._retrieve(job)
                tasks = jobs.tasks_for(job, self.context)  # inputs now exist locally
            adopted = self._adopt(job, tasks)
            # an adopted task may be writing its outputs: they stay
            record.backups = outputs.prepare(job, tasks, self.workflow.async_run,
                                             keep_outputs=adopted is not None)
            record.places.update(outputs.benchmark_places(tasks))
            record.order = groups.order(job, record.launch, self.context)
            record.chain = self.rounds.start(record.track(tasks), record.to_come, adopted=adopted)
            record.flight = self._group_runs.start(job, record.chain.handle)
        except ImageUnavailable as e:
            self._report_error(info, self._image_message(job, e))
            return
        except CrankError as e:
            self._report_error(info, str(e))
            return
        self.report_job_submission(
            SubmittedJobInfo(job, external_jobid=record.chain.handle, aux={"record": record})
        )

    def _adopt(self, job, tasks) -> Optional[Adopted]:
        """A dead run's task doing this job's work, if there is one. Only a job of one
        task: a group's later jobs start after Snakemake removed their outputs."""
        if not self._orphans_kept or len(tasks) != 1 or job.is_group():
            return None
        adopted = self.backend.adopt(tasks[0])
        if adopted is not None:
            self.logger.info(f"crank: {_label(job)} (job {job.jobid}) adopts the {self._unit} an earlier run left")
        return adopted

    def _cancel_unclaimed(self) -> None:
        """Once every job this run will run was handed over, cancel the dead runs' tasks
        that none adopted (a checkpoint still to finish may add jobs: wait for it)."""
        if not self._orphans_kept or self._others_alive():
            return
        dag = self.workflow.dag
        # in Snakemake's status thread: its main thread empties and refills these sets as a
        # checkpoint ends, under its scheduler's lock
        with scheduler.lock(self.workflow):
            try:
                if any(not dag.finished(j) for j in dag.checkpoint_jobs):
                    return
                if any(j not in self._submitted for j in dag.needrun_jobs()):
                    return
            except RuntimeError:  # changed while read all the same: the next round
                return
        try:
            removed = self.backend.cancel_orphans()
        except CrankError as e:
            self.logger.warning(f"crank: {e}")  # tried again at the end of the run
            return
        self._orphans_kept = 0
        if removed:
            self.logger.info(f"crank: removed {removed} {self._unit}(s) left by an earlier run")

    def _others_alive(self) -> bool:
        """Whether another run of this workdir started since: it may have adopted what is
        left of the dead runs, which this run then must not cancel."""
        return bool(runs.live_runs(self._workdir) - {self.run_id})

    async def check_active_jobs(
        self, active_jobs: List[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        following = [info for info in active_jobs if "follows" in info.aux]
        async for info in self._check_runs([info for info in active_jobs if "follows" not in info.aux]):
            yield info
        if self._canceling:
            return
        dag = self.workflow.dag
        for info in following:
            leader = info.aux["follows"]
            # once Snakemake has taken in the group outcome reported before: taking a
            # group's success in can change the jobs of the group that follows
            if not leader.settled(dag) or not (self._group_reported is None or self._group_reported.settled(dag)):
                yield info
                continue
            ended = leader.ended
            if ended.ok:
                self._report_success(info)
            else:
                self._report_error(info, ended.message, ended.logs)

    async def _check_runs(self, active_jobs: List[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        """One status round over the jobs whose tasks crank runs; those still active."""
        if self._canceling:
            return  # crank removes these tasks itself: nothing to report
        self._cancel_unclaimed()
        if not active_jobs:
            # nothing to ask the backend; look again soon so new jobs are seen early
            # (this also covers the first round, which can come before __post_init__)
            self.next_seconds_between_status_checks = IDLE_INTERVAL
            return
        chains = [info.aux["record"].chain for info in active_jobs]
        ceiling = self.workflow.remote_execution_settings.seconds_between_status_checks
        try:
            async with self.status_rate_limiter:
                done = self.rounds.step(chains)
        except RoundFailed as e:
            failing_for = e.failing_for
            if not e.given_up:
                self.logger.warning(f"crank: status check failed, will retry: {e}")
                self.next_seconds_between_status_checks = min(ceiling, max(1.0, failing_for))
                for info in active_jobs:
                    yield info
                return
            # remove the tasks before reporting: Snakemake then deletes whatever they wrote
            try:
                self.rounds.cancel(chains)
                removed = True
            except CrankError:
                removed = False
            message = (
                f"crank lost the backend for {failing_for:.0f} s ({e}); the job is reported "
                "failed" + ("" if removed else ", its outputs are marked incomplete")
            )
            for info in active_jobs:
                self._given_up.append((info.job, removed))
                self._report_error(info, message)
            return
        if self._canceling:
            return  # canceled while the round ran
        records = {info.aux["record"].chain: info.aux["record"] for info in active_jobs}
        for chain, results in done.succeeded.items():
            for task, result in results:
                records[chain].succeeded(task, result)
        for chain in done.waiting:
            outcome = self._next_tasks(chain, records[chain])
            if outcome is not None:
                done.ended[chain] = outcome
        for info in active_jobs:
            record = info.aux["record"]
            chain = record.chain
            outcome = done.ended.get(chain)
            if outcome is None:
                yield info
                continue
            self._trace.add(info.job, outcome.attempts, self.logger.warning)
            problem = None
            if outcome.ok:
                problem = await self._after_success(record)
            if outcome.ok and problem is None:
                self._report_success(info)
            else:
                await self._failed_logs(info.job, chain.tasks)
                if record.direct:
                    await self._store_logs(info.job)
                message = outcome.message
                if isinstance(outcome.error, ImageUnavailable):  # a pull that failed later
                    message = self._image_message(info.job, outcome.error)
                self._report_error(info, problem or message, outcome.log_files)
            self._release(chain)
        still = [c for c in chains if c not in done.ended]
        self.next_seconds_between_status_checks = Rounds.next_interval(
            still, self.rounds.clock(), ceiling
        )

    def _next_tasks(self, chain: Chain, record: JobRecord) -> Optional[Outcome]:
        """A group's next job started in the round its job before succeeded, as locally;
        the chain's outcome when that ends it."""
        try:
            tasks = record.next_tasks()
        except CrankError as e:
            return self.rounds.failed(chain, str(e), e)
        except OSError as e:  # e.g. a touch() output that cannot be made
            return self.rounds.failed(chain, f"{chain.current.label}: {e}")
        return self.rounds.extend(chain, tasks)

    def _image_message(self, job, error: ImageUnavailable) -> str:
        source = jobs.image_source(job, self.context)
        return image_message(error, source, self.settings, self.context.default_image)

    async def _after_success(self, record: JobRecord) -> Optional[str]:
        """What follows the success of a job's tasks; why the job fails, or None."""
        job, tasks = record.job, record.chain.tasks
        if record.direct:
            # what Snakemake does after a job, which no Snakemake in the image did
            try:
                record.member_finished()
            except OSError as e:  # as for a job of the group before it
                return f"{tasks[-1].label}: {e}"
            # outputs the backend stored itself have no local copy to check
            stored = {o.path for t in tasks for o in t.outputs if o.url}
            problem = (
                await outputs.finish(job, tasks, record.seconds, record.places, in_storage=stored)
                or await self._store(job, stored)
            )
            if problem:
                return problem
            outputs.forget(record.backups)
            record.backups = []
        return await storage.to_cache(job, self.workflow)

    def _retrieve(self, job) -> None:
        try:
            self.workflow.async_run(storage.retrieve_inputs(job, self.context.input_urls(job)))
        except Exception as e:  # the plugin's or Snakemake's message
            cause = " ".join(str(e).split())  # Snakemake's nested message, on one line
            raise CrankError(f"{_label(job)}: retrieving its storage inputs failed: {cause}") from None

    async def _store(self, job, stored=()) -> Optional[str]:
        """The storage outputs of a job that ran directly, stored (``stored``: those the
        backend stored itself, checked); or why not."""
        try:
            await storage.store_outputs(job, stored)
        except Exception as e:  # the plugin's or Snakemake's message
            return f"{_label(job)}: storing its outputs failed: {e}"
        return None

    async def _failed_logs(self, job, tasks) -> None:
        try:
            await outputs.failed_logs(job, tasks)
        except OSError as e:  # the job's own failure is what gets reported
            self.logger.warning(f"crank: cannot make the missing logs of job {job.jobid} ({e})")

    async def _store_logs(self, job) -> None:
        try:
            await storage.store_logs(job)
        except Exception as e:  # the job's own failure is what gets reported
            self.logger.warning(f"crank: cannot store the logs of job {job.jobid} ({e})")

    def _from_cache(self, job) -> bool:
        """A job whose outputs the between-workflow cache holds succeeds without a task,
        as locally."""
        if not storage.restore_cached(job, self.workflow):
            return False
        self.report_job_success(SubmittedJobInfo(job))
        return True

    def _release(self, chain) -> None:
        try:
            self.rounds.release(chain)
        except CrankError as e:
            # the outcome is reported; what is left is removed at shutdown or next start
            self.logger.warning(f"crank: {e}")

    def _report_success(self, info: SubmittedJobInfo) -> None:
        self._before_outcome(info, Ended(ok=True))
        self.report_job_success(info)

    def _before_outcome(self, info: SubmittedJobInfo, ended: Ended) -> None:
        """The job's outcome is reported: the submissions that follow its run end as it did;
        for a group, Snakemake may have changed its jobs meanwhile (group_runs.py)."""
        record = (info.aux or {}).get("record")
        if record is not None:
            self._group_runs.end(record.flight, ended)
        if info.job.is_group():
            group_runs.rehash_running(self.workflow, info.job)
            self._group_reported = Flight(frozenset(), "", info.job, tuple(info.job.jobs), ended=ended,
                                          ended_at=time.monotonic())

    def _report_error(self, info: SubmittedJobInfo, message: str, logs=()) -> None:
        self._before_outcome(info, Ended(ok=False, message=message, logs=tuple(logs)))
        record = (info.aux or {}).get("record")
        if record is not None and record.backups:
            self._to_restore[info.job] = record
        if info.job.is_group():
            # Snakemake does not print the message of a failed group job
            self.logger.error(message)
        self.report_job_error(info, msg=message + "\n", aux_logs=list(logs))

    def handle_job_error(self, job: JobExecutorInterface):
        # Snakemake has just removed the failed job's outputs: update() ones come back
        super().handle_job_error(job)
        record = self._to_restore.pop(job, None)
        if record is not None:
            outputs.restore(record.backups, self.logger.warning)

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]):
        self._canceling = True
        # Snakemake's status thread may be inside a download, and shutdown waits for it
        self.backend.interrupt()
        if self.settings.detach:
            # also a task submitted while Ctrl-C came, before Snakemake listed its job
            self._detached = True
            return
        try:
            # a submission that follows another has no tasks of its own
            self.rounds.cancel([info.aux["record"].chain for info in active_jobs if "record" in info.aux])
        except CrankError as e:
            # shutdown tries again; the next start in this workdir removes what is left
            self.logger.warning(f"crank: {e}")

    def shutdown(self):
        super().shutdown()
        self._canceling = True
        detach = self._detached
        try:
            if not detach and self._orphans_kept and not self._others_alive():
                self.backend.cancel_orphans()  # what dead runs left that no job adopted
                self._orphans_kept = 0
            self.backend.close(detach=detach)
            closed = True
        except CrankError as e:
            closed = False
            self.logger.warning(
                f"crank: could not remove this run's {self._unit}s ({e}); the next crank run in "
                "this directory removes them"
            )
        self._fence_given_up(closed)
        self._trace.close(self.logger.info, self.logger.warning)
        if detach:
            # the run file stays: the next run finds this run dead and adopts its tasks
            self.logger.info(
                f"crank: the running {self._unit}s are left running (--crank-detach); run the "
                "same command again with --rerun-incomplete to adopt them"
            )
            return
        if closed and not self._orphans_kept:  # what dead runs left is adopted or canceled
            for run_id in self._dead_runs:
                runs.forget_run(self._workdir, run_id)
        runs.forget(self._run_file)

    def _fence_given_up(self, closed: bool) -> None:
        """Jobs reported failed while their task may still run: a task that outlives
        Snakemake could write outputs after Snakemake deleted them. Mark those outputs
        incomplete, so a later run never takes them as complete."""
        pending = [job for job, removed in self._given_up if not removed]
        if not pending:
            return
        persistence = self.workflow.persistence
        for job in pending:
            for single in jobs.single_jobs(job):
                persistence.started(single)
        if not closed:
            self.logger.warning(
                "crank: the outputs of jobs whose task could not be stopped are marked "
                "incomplete; rerun with --rerun-incomplete once the engine is back"
            )
