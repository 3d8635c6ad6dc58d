"""TES backend: each task is one GA4GH TES 1.0/1.1 task (Funnel, TESK, Microsoft TES).

Files travel through object storage (the Stagers handed in): local inputs by content to
``<prefix>/cas/sha256/<hex>``, products back from ``<prefix>/runs/<run>/<submission>/``.
The container layout (why nothing is mounted at the user's paths) is in ``layout``.

Status: ``monitor`` asks each round for the tasks still watched (tagged lists by state, a
GetTask for the few they miss); ``GetTask`` (FULL) only for a task that turned terminal. Staging and
creating run in a small thread pool, so ``submit`` returns at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import tes

from ... import runs
from ...errors import BackendUnavailable, CrankError
from ...staging.digest import sha256_file
from ...staging import tree
from ...staging.stage import Stager
from ...staging.staged import Staged
from ...task import Adopted, Capacity, Kind, State, TaskResult, TaskSpec
from ..adoption import Adoption, Orphan, key_of, products_id
from ..live import LiveLog, live_logs
from . import orphans, sources
from .api import TesApi
from .http import HttpError
from .monitor import Monitor
from .options import TesOptions
from .queue_view import QueueView
from .results import Collector
from .tails import Tails
from .tasks import (
    CLOSE_STATES,
    NON_TERMINAL,
    STATES,
    TAG_JOB,
    TAG_KEY,
    TAG_ORIGIN,
    TAG_PRODUCTS,
    TAG_RULE,
    TAG_RUN,
    TAG_SUBMISSION,
    TAG_WORKDIR,
    executor_start,
    task_body,
    to_tes_task,
    workdir_tag,
)


def still_active(api: TesApi, run_id: str) -> List[tes.Task]:
    """The run's tasks that may still wait or run, whatever its process knows of them (a
    create whose answer was lost, a cancel dropped at shutdown): one list per active state,
    so the end of a run costs what is still active, not a list of every task it finished
    (45 MiB at 10,000 tasks)."""
    return api.list_tasks(TAG_RUN, run_id, view="BASIC", bounded=True, states=CLOSE_STATES)


@dataclass(eq=False)
class _Submission:
    handle: str
    task: TaskSpec
    tag: str  # value of TAG_SUBMISSION
    prefix: str  # of its objects in the store: runs/<run>/<handle>
    run: str  # the run that created it (another for an adopted task)
    future: Optional[Future] = None
    tes_id: Optional[str] = None
    error: Optional[str] = None
    canceled: bool = False
    last_state: Optional[str] = None
    digests: Tuple[str, ...] = ()  # of its inputs
    staged_bytes: Optional[int] = None  # of its local inputs
    resubmitted: bool = False  # once, after a SYSTEM_ERROR before its command started
    live: Dict[str, LiveLog] = field(default_factory=dict)  # its logs while it runs (tails.py)


class TesBackend:
    """``api``: the server, already found to answer; ``stager``: uploads inputs; ``fetcher``:
    downloads products, with a pool and store client of its own so that a status round never
    waits behind input uploads."""

    def __init__(
        self,
        run_id: str,
        workdir: str,
        options: TesOptions,
        api: TesApi,
        stager: Stager,
        fetcher: Stager,
        report: Optional[Callable[[str], None]] = None,
    ):
        self.run_id = run_id
        self.workdir = os.path.abspath(workdir)
        self.options = options
        self.api = api
        self.http = api.http
        self.stager = stager
        self.store = stager.store
        self.fetcher = fetcher
        self.report = report or (lambda line: None)
        tmp_root = os.path.join(self.workdir, ".snakemake", "crank", "tmp", run_id)
        self.collector = Collector(fetcher, tmp_root)
        self._pool = ThreadPoolExecutor(max(1, options.submit_workers), thread_name_prefix="crank-tes")
        self._lock = threading.Lock()
        self._subs: Dict[str, _Submission] = {}
        self._sources_lock = threading.Lock()
        self._source_sets: Dict[Tuple[str, ...], Tuple[str, str]] = {}
        self._closing = False
        self.tags = {TAG_RUN: run_id, TAG_WORKDIR: workdir_tag(self.workdir),
                     TAG_ORIGIN: runs.origin(self.workdir)}
        # one per run whose tasks this run follows: its own, and those it adopted from
        self.monitors: Dict[str, Monitor] = {run_id: Monitor(api, TAG_RUN, run_id)}
        self.tails = Tails(api, TAG_RUN, run_id)
        self.adoption: Adoption[Tuple[str, str]] = Adoption(self)  # (task id, submission tag)
        self._dead_tmp: List[str] = []
        self.queue_view = QueueView(self.http.base, self.report)

    @property
    def monitor(self) -> Monitor:
        return self.monitors[self.run_id]

    def capacity(self) -> Capacity:
        return Capacity()  # TES does not say; the server refuses what it cannot run

    def gather_orphans(self, live_runs: Collection[str], dead_runs: Collection[str]) -> Tuple[int, int]:
        """Keep the dead runs' tasks that can be adopted (running, or ended by themselves
        while nobody watched); cancel the other non-terminal tasks of runs that are gone."""
        keep = {self.run_id, *live_runs}
        stale, self.adoption.orphans = orphans.gather(self.api, self.store, self.tags, keep, dead_runs,
                                                      self.report)
        # what runs that are gone left half downloaded: removed when this run ends
        with contextlib.suppress(OSError):
            for entry in os.scandir(os.path.dirname(self.collector.tmp_root)):
                if entry.name not in keep and entry.is_dir(follow_symlinks=False):
                    self._dead_tmp.append(entry.path)
        return stale, len(self.adoption)

    def adopt(self, task: TaskSpec) -> Optional[Adopted]:
        return self.adoption.adopt(task)

    def cancel_orphans(self) -> int:
        return self.adoption.cancel_rest()

    # what adoption.Adoption asks of its source

    def orphan_key(self, task: TaskSpec) -> str:
        return key_of(task, self.stager.cache.digest, self.stager.store.location)

    def take_orphan(self, orphan: Orphan, task: TaskSpec) -> str:
        tes_id, tag = orphan.ref
        run, old_handle = tag.split(":", 1)
        with self._lock:
            handle = self._new_handle(task)
            sub = _Submission(handle=handle, task=task, tag=tag, prefix=f"runs/{run}/{old_handle}",
                              run=run, tes_id=tes_id)
            self._subs[handle] = sub
        self._monitor_of(sub).add(tes_id)
        return handle

    def drop_orphans(self, left: Sequence[Orphan], quietly: bool) -> int:
        active = [o for o in left if not o.finished]  # an ended task has nothing to cancel
        for orphan in active:
            if quietly:
                self._cancel_quietly(orphan.ref[0])
            else:
                self.api.cancel_task(orphan.ref[0])
        return len(active)

    def _monitor_of(self, sub: _Submission) -> Monitor:
        with self._lock:
            if sub.run not in self.monitors:
                self.monitors[sub.run] = Monitor(self.api, TAG_RUN, sub.run)
            return self.monitors[sub.run]

    # ------------------------------------------------------------------ submit

    def submit(self, task: TaskSpec) -> str:
        if self._closing:
            raise CrankError("crank is shutting down")
        self.adoption.stop_other_versions(task)
        with self._lock:
            handle = self._new_handle(task)
            sub = _Submission(
                handle=handle, task=task, tag=f"{self.run_id}:{handle}",
                prefix=f"runs/{self.run_id}/{handle}", run=self.run_id, live=live_logs(task),
            )
            self._subs[handle] = sub
        sub.future = self._pool.submit(self._stage_and_create, sub)
        return handle

    def _new_handle(self, task: TaskSpec) -> str:
        """(under the lock) A handle no submission of this run has."""
        base = f"{task.job_id}-{task.attempt}"
        n = 0
        handle = base
        while handle in self._subs:
            n += 1
            handle = f"{base}-r{n}"
        return handle

    def _stage_and_create(self, sub: _Submission) -> None:
        try:
            staged = self._stage(sub.task)
            sub.digests = tuple(s.digest for s in staged if s.digest)
            sub.staged_bytes = sum(s.size for s in staged if s.digest)
            tags = {**self.tags, TAG_JOB: f"{sub.task.job_id}-{sub.task.attempt}",
                    TAG_RULE: sub.task.label, TAG_SUBMISSION: sub.tag,
                    TAG_KEY: self.orphan_key(sub.task), TAG_PRODUCTS: products_id(sub.task)}
            source_set = self._source_set(sub.task.sources) if sub.task.sources else None
            body = task_body(to_tes_task(sub.task, staged, self.store.url(sub.prefix), tags, source_set))
            if sub.canceled or self._closing:
                return
            tes_id = self.api.create_task(body, TAG_SUBMISSION, sub.tag, stopping=lambda: self._closing)
            self.monitor.add(tes_id)  # before a status round can see the id
            sub.tes_id = tes_id
            if sub.canceled or self._closing:
                self.api.cancel_task(tes_id)
        except CrankError as e:
            sub.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported as the task's failure, one line
            sub.error = f"staging failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _stage(self, task: TaskSpec) -> List[Staged]:
        staged = [Staged(i.path, i.url, remote_dir=i.kind is Kind.DIRECTORY) for i in task.inputs if i.url]
        # an update() output is changed in place: its old content goes in too
        local = [i.path for i in task.inputs if not i.url] + [o.path for o in task.outputs if o.update]
        if local:
            # Snakemake checks a job's inputs before it hands the job over; a local path
            # missing here is a workflow source it lists but nothing made (e.g. a wrapper's
            # environment.yaml): on Docker a missing path is simply not there either
            entries = self.stager.stage(local, missing_ok=True)
            staged += entries
            # the directories on the way get the client's modes and times too, where they may
            staged += [Staged(a.path, directory=True, mode=a.mode, mtime_ns=a.mtime_ns, ancestor=True)
                       for a in tree.ancestors([e.path for e in entries])]
        return staged

    def _source_set(self, paths: Tuple[str, ...]) -> Tuple[str, str]:
        """(digest, URL) of the workflow's sources as one archive (``sources``), made once
        per run and stored by content under ``sources/`` (an earlier run's identical archive
        is not sent again), through the download side's store client: every shell: task
        needs it, so it never waits in the upload pool behind other jobs' inputs."""
        with self._sources_lock:
            known = self._source_sets.get(paths)
            if known:
                return known
            os.makedirs(self.collector.tmp_root, exist_ok=True)
            archive = os.path.join(self.collector.tmp_root, f"sources-{len(self._source_sets)}.tar")
            sources.write_archive(paths, archive)
            digest = sha256_file(archive)
            key = f"{sources.PREFIX}/{digest}"
            store = self.fetcher.store
            if store.head(key) is None:
                store.put_file(archive, key, sha256=digest)
            self._source_sets[paths] = (digest, store.url(key))
            return self._source_sets[paths]

    # ------------------------------------------------------------------ status

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        subs = [self._subs[h] for h in handles if h in self._subs]
        listed: Dict[str, str] = {}
        if any(s.tes_id for s in subs):
            try:
                for monitor in list(self.monitors.values()):
                    listed.update(monitor.round())
            except BackendUnavailable:
                raise
            except CrankError as e:
                # final (credentials refused, wrong URL, a listing that pages for ever): these
                # tasks cannot be followed
                self._lose_sight(subs, e)
        states: Dict[str, State] = {}
        for h in handles:
            sub = self._subs.get(h)
            if sub is None:
                states[h] = State.LOST
            elif sub.error is not None:
                states[h] = State.FINISHED
            elif sub.tes_id is None:
                # still staging; or the pool ended without an id (canceled)
                states[h] = State.QUEUED if not (sub.future and sub.future.done()) else State.CANCELED
            elif sub.tes_id in listed:
                sub.last_state = listed[sub.tes_id]
                lost_inputs = sub.last_state == "SYSTEM_ERROR" and self._resubmit_without_inputs(sub)
                states[h] = State.QUEUED if lost_inputs else STATES.get(sub.last_state, State.QUEUED)
            elif self._monitor_of(sub).young(sub.tes_id):
                states[h] = State.QUEUED
            else:
                states[h] = State.LOST
        self.queue_view.update(s.last_state for s in subs if s.tes_id and s.last_state)
        self.tails.round({s.tes_id: s.live for s in subs
                          if s.tes_id and s.last_state == "RUNNING" and s.run == self.run_id})
        return states

    def _resubmit_without_inputs(self, sub: _Submission) -> bool:
        """A task that ended in SYSTEM_ERROR before its command started could not fetch its
        inputs: an object this run, or the digest database, took to be in the store may have
        been removed (a lifecycle rule, a colleague's clean-up). Once per job attempt, and
        without charging Snakemake's --retries: look the inputs and the sources up again,
        send what is missing, and submit anew. Whether it was submitted again."""
        if sub.resubmitted or sub.canceled or self._closing or sub.run != self.run_id:
            return False  # an adopted task's failure is reported as it came
        try:
            if executor_start(self.api.get_task(sub.tes_id, view="BASIC")) is not None:
                return False  # the command ran: a failure of its own
        except HttpError:
            return False
        self.stager.forget(sub.digests)
        with self._sources_lock:
            self._source_sets.clear()
        self.report(f"{sub.task.label}: task {sub.tes_id} could not fetch its inputs (SYSTEM_ERROR); "
                    "sending them again and submitting it once more")
        self._monitor_of(sub).remove(sub.tes_id)
        sub.resubmitted, sub.tes_id, sub.last_state = True, None, None
        sub.tag += "-again"  # a lookup after a lost create answer must not find the failed one
        sub.future = self._pool.submit(self._stage_and_create, sub)
        return True

    def _lose_sight(self, subs: Sequence[_Submission], error: CrankError) -> None:
        """Fail the created tasks with the server's refusal, once; cancel them if it lets."""
        for sub in subs:
            if sub.tes_id and sub.error is None:
                sub.error = f"crank cannot follow task {sub.tes_id} any more: {error}"
                self._cancel_quietly(sub.tes_id)

    def stop(self, handle: str) -> None:
        sub = self._subs.get(handle)
        if sub is None:
            return
        sub.canceled = True
        if sub.tes_id:
            self.api.cancel_task(sub.tes_id)

    # ------------------------------------------------------------------ results

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        sub = self._subs.get(handle)
        if sub is None:
            return TaskResult(ok=False, reason="crank lost track of this task")
        if sub.error is not None:
            return TaskResult(ok=False, reason=sub.error)
        if sub.tes_id is None:
            return TaskResult(ok=False, reason="canceled before it was created on the TES server")
        try:
            full = self.api.get_task(sub.tes_id)
        except HttpError as e:
            if e.status == 404 and self._monitor_of(sub).young(sub.tes_id):
                raise BackendUnavailable(f"task {sub.tes_id} not found yet") from None
            raise CrankError(f"{task.label}: the TES server lost task {sub.tes_id} ({e})") from None
        if full.state == "SYSTEM_ERROR":
            # perhaps an input removed from the store meanwhile: a retry of the job looks its
            # inputs up again instead of trusting this run's memory
            self.stager.forget(sub.digests)
        return self.collector.collect(full, sub.prefix, sub.handle, task, sub.staged_bytes, sub.live)

    def release(self, handles: Sequence[str]) -> None:
        for h in handles:
            sub = self._subs.pop(h, None)
            if sub is None or self._closing:
                continue
            if sub.tes_id:
                self._monitor_of(sub).remove(sub.tes_id)
                if sub.last_state in NON_TERMINAL:
                    # a chain that failed while its task still ran: the task must not outlive it
                    self._pool.submit(self._cancel_quietly, sub.tes_id)
            if not self.options.keep_run_objects:
                self._pool.submit(self._delete_objects, sub.prefix)

    def _cancel_quietly(self, task_id: str) -> None:
        try:
            self.api.cancel_task(task_id)
        except CrankError:
            pass  # refused or no answer: the run's shutdown and the next start try again

    def _delete_objects(self, prefix: str) -> None:
        try:
            for key, _ in self.store.list(prefix):
                self.store.delete(key)
        except CrankError:
            pass  # left for a lifecycle rule; never worth failing a job

    # ------------------------------------------------------------------ cancel

    def cancel(self, handles: Sequence[str]) -> None:
        for h in handles:
            sub = self._subs.get(h)
            if sub is None:
                continue
            sub.canceled = True
            if sub.tes_id and (sub.last_state is None or sub.last_state in NON_TERMINAL):
                self.api.cancel_task(sub.tes_id)

    def interrupt(self) -> None:
        self._closing = True
        self.stager.stop()  # inputs still uploading are abandoned, not awaited
        self.fetcher.stop()  # and so are products still downloading

    def close(self, detach: bool = False) -> None:
        try:
            for sub in list(self._subs.values()):
                sub.canceled = True
            self.interrupt()
            self._pool.shutdown(wait=True, cancel_futures=True)
            if not detach:
                for t in still_active(self.api, self.run_id):
                    if t.state in NON_TERMINAL:
                        self.api.cancel_task(t.id)
                for sub in self._subs.values():  # adopted: tagged with another run
                    if sub.run != self.run_id and sub.tes_id and sub.last_state in (None, *NON_TERMINAL):
                        self.api.cancel_task(sub.tes_id)
        finally:
            for monitor in self.monitors.values():
                monitor.close()
            self.stager.close()
            self.fetcher.close()
            if self.stager.stats.files:
                self.report(self.stager.summary())
            self.http.close()
            for path in (self.collector.tmp_root, *self._dead_tmp):
                shutil.rmtree(path, ignore_errors=True)
