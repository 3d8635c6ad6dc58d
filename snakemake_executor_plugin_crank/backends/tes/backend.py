"""TES backend: each task is one GA4GH TES 1.0/1.1 task (Funnel, TESK, Microsoft TES).

Files travel through object storage (``staging``): local inputs by content to
``<prefix>/cas/sha256/<hex>``, products back from ``<prefix>/runs/<run>/<submission>/``.
The container layout (why nothing is mounted at the user's paths) is in ``tes_layout``.

Status: one paginated ``ListTasks`` (tag ``crank-run``, view MINIMAL) per round for every
task; ``GetTask`` (FULL) only for a task that turned terminal. Staging and creating run in a
small thread pool, so ``submit`` returns at once.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import tes

from ..errors import BackendUnavailable, CrankError
from ..task import Capacity, Kind, State, TaskResult, TaskSpec
from . import tes_layout as layout
from .http import HttpError, Session, Throttled
from .logs import save_logs
from .paths import under
from .stamps import seconds_between

TAG_RUN = "crank-run"
TAG_JOB = "crank-job"
TAG_RULE = "crank-rule"
TAG_WORKDIR = "crank-workdir"
TAG_SUBMISSION = "crank-submission"

# Microsoft TES accepts at most 2047; Funnel 2048
PAGE_SIZE = 2047
# how long a created task may be missing from ListTasks / GetTask (404) before it is LOST
APPEAR_GRACE_S = 60.0
CREATE_ATTEMPTS = 5
# the longest a create waits at once for a server that asked it to (429, Retry-After)
CREATE_WAIT_MAX_S = 30.0
# Status rounds, collections, cancels and the shutdown run on Snakemake's loop: one attempt,
# a bounded wait. A server that does not answer then fails the round, and the runner tries
# again next round within --crank-backend-tolerance (retrying reads here would hold the loop
# for minutes).
BOUNDED_READ_TIMEOUT_S = 20.0
BOUNDED = {"timeout": BOUNDED_READ_TIMEOUT_S, "retry_reads": False}

STATES = {
    "UNKNOWN": State.QUEUED,
    "QUEUED": State.QUEUED,
    "INITIALIZING": State.QUEUED,
    "RUNNING": State.RUNNING,
    "PAUSED": State.RUNNING,
    "COMPLETE": State.FINISHED,
    "EXECUTOR_ERROR": State.FINISHED,
    "SYSTEM_ERROR": State.FINISHED,
    "CANCELED": State.CANCELED,
    "CANCELING": State.CANCELED,
    "PREEMPTED": State.PREEMPTED,
}
NON_TERMINAL = ("UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "PAUSED")


@dataclass(frozen=True)
class TesOptions:
    url: str
    storage_prefix: str
    user: Optional[str] = None
    password: Optional[str] = None
    token: Optional[str] = None
    storage_endpoint: Optional[str] = None
    # concurrent stage-and-create jobs (each stages with the stager's own upload pool)
    submit_workers: int = 4
    upload_workers: int = 8
    # downloads of finished tasks' products: a pool and store client of their own, so a
    # status round never waits behind input uploads
    download_workers: int = 8
    # remove a task's objects under runs/ once its outcome is reported
    keep_run_objects: bool = False


def workdir_tag(workdir: str) -> str:
    return hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


def resources_of(task: TaskSpec) -> tes.Resources:
    """Exact mapping: decimal MB to GB, never rounded up; GPUs as backend parameters."""
    r = task.resources
    params = {"gpus": str(r.gpus)} if r.gpus else {}
    if r.gpus and r.gpu_model:
        params["gpu_model"] = r.gpu_model
    return tes.Resources(
        cpu_cores=r.cpus,
        ram_gb=r.mem_mb / 1000 if r.mem_mb else None,
        disk_gb=r.disk_mb / 1000 if r.disk_mb else None,
        preemptible=True if r.preemptible else None,
        backend_parameters=params or None,
    )


def to_tes_task(
    task: TaskSpec, staged: Sequence[layout.Staged], out_url: str, tags: Mapping[str, str]
) -> tes.Task:
    """The TES task for ``task`` whose inputs are ``staged``; products go to ``out_url``."""
    inputs, seen = [], set()
    for s in staged:
        path = layout.container_path(s)
        if s.link or path in seen:
            continue
        seen.add(path)
        inputs.append(tes.Input(url=s.url, path=path, type="DIRECTORY" if s.directory else "FILE"))
    dirs = layout.input_dirs(task)
    script = layout.wrapper_script(task, staged, dirs)
    inputs.append(tes.Input(path=layout.WRAPPER, content=script, type="FILE"))
    inputs.append(tes.Input(path=layout.COMMAND, content=task.script, type="FILE"))
    executor = tes.Executor(
        image=task.image,
        command=["/bin/sh", layout.WRAPPER],
        stdout=layout.STDOUT,
        stderr=layout.STDERR,
        env=dict(task.env) or None,
    )
    return tes.Task(
        name=task.name,
        description=f"crank: {task.label} (job {task.job_id}, attempt {task.attempt})",
        inputs=inputs,
        outputs=[tes.Output(path=layout.OUT, url=out_url, type="DIRECTORY")],
        resources=resources_of(task),
        executors=[executor],
        volumes=layout.volumes(layout.needed_dirs(task, staged)),
        tags=dict(tags),
    )


def task_body(t: tes.Task) -> Dict[str, Any]:
    ok, error = t.is_valid()
    if not ok:
        raise CrankError(f"crank built an invalid TES task: {error}")
    return t.as_dict()


@dataclass(eq=False)
class _Submission:
    handle: str
    task: TaskSpec
    tag: str  # value of TAG_SUBMISSION
    key: str  # runs/<run>/<handle>
    future: Optional[Future] = None
    tes_id: Optional[str] = None
    error: Optional[str] = None
    created_at: Optional[float] = None
    canceled: bool = False
    last_state: Optional[str] = None
    digests: Tuple[str, ...] = ()  # of its inputs


class TesBackend:
    def __init__(
        self,
        run_id: str,
        workdir: str,
        options: TesOptions,
        session: Optional[Session] = None,
        report: Optional[Callable[[str], None]] = None,
    ):
        from ..staging.digest import DigestCache
        from ..staging.stage import Stager
        from ..staging.store import Store

        self.run_id = run_id
        self.workdir = os.path.abspath(workdir)
        self.options = options
        self.http = session or Session(options.url, options.user, options.password, options.token)
        self.service_info = self._service_info()
        self.store = Store.from_url(options.storage_prefix, options.storage_endpoint)
        self.store.check()
        state_dir = os.path.join(self.workdir, ".snakemake", "crank")
        os.makedirs(state_dir, exist_ok=True)
        self.cache = DigestCache(os.path.join(state_dir, "digests.sqlite"))
        self.report = report or (lambda line: None)
        self.fetcher = Stager(
            Store.from_url(options.storage_prefix, options.storage_endpoint), self.cache,
            workers=options.download_workers,
        )
        self.stager = Stager(
            self.store, self.cache, workers=options.upload_workers, progress=self.report
        )
        self.tmp_root = os.path.join(state_dir, "tmp", run_id)
        self._pool = ThreadPoolExecutor(max(1, options.submit_workers), thread_name_prefix="crank-tes")
        self._lock = threading.Lock()
        self._subs: Dict[str, _Submission] = {}
        self._counts: Dict[str, int] = collections.Counter()
        self._closing = False
        self._filter_ignored = False  # said once per run
        self.tags = {TAG_RUN: run_id, TAG_WORKDIR: workdir_tag(self.workdir)}

    # ------------------------------------------------------------------ setup

    def _service_info(self) -> Mapping[str, Any]:
        try:
            info = self.http.request("GET", "/v1/service-info", "service-info", timeout=20)
        except Throttled as e:
            raise CrankError(f"{e}; try again later") from None
        except BackendUnavailable as e:
            raise CrankError(f"{e}; check --crank-tes-url") from None
        except HttpError as e:
            raise CrankError(str(e)) from None
        if not isinstance(info, dict):
            raise CrankError(f"{self.http.base}/v1/service-info is not a TES service-info")
        return info

    def capacity(self) -> Capacity:
        return Capacity()  # TES does not say; the server refuses what it cannot run

    # ------------------------------------------------------------------ listing

    def list_tasks(
        self, tag_key: str, tag_value: str, view: str = "MINIMAL", bounded: bool = False
    ) -> List[Mapping[str, Any]]:
        """Every task with the tag, following page tokens until the server has no more.
        ``bounded``: one attempt with a bounded wait (see BOUNDED).

        The server's filter is not trusted (TES 1.0 has none; a proxy may drop the query):
        with a view that carries tags (BASIC, FULL) only the tasks whose tag is checked here
        are returned. MINIMAL carries none: use it only to look up ids crank made itself."""
        found: List[Mapping[str, Any]] = []
        token = None
        while True:
            params = {"tag_key": tag_key, "tag_value": tag_value, "view": view, "page_size": PAGE_SIZE}
            if token:
                params["page_token"] = token
            page = self.http.request("GET", "/v1/tasks", "list", params=params, **(
                BOUNDED if bounded else {})) or {}
            if not isinstance(page, dict):
                raise BackendUnavailable(
                    f"the TES server at {self.http.base} answered GET /v1/tasks with something "
                    "other than a task list")
            found.extend(page.get("tasks") or [])
            token = page.get("next_page_token") or page.get("nextPageToken")
            if not token or not page.get("tasks"):
                break
        if view == "MINIMAL":
            return found
        mine = with_tag(found, tag_key, tag_value)
        if len(mine) < len(found) and not self._filter_ignored:
            self._filter_ignored = True
            self.report(
                f"the TES server at {self.http.base} ignores the tag filter of ListTasks (a TES "
                "1.0 server, or a proxy that drops query parameters): crank checks every task's "
                "tags itself and touches only its own, but each status round lists every task "
                "on the server"
            )
        return mine

    def remove_orphans(self, live_runs: Collection[str]) -> int:
        """Cancel the non-terminal tasks that dead runs in this workdir left (they crashed)."""
        keep = {self.run_id, *live_runs}
        stale = [
            t["id"]
            for t in self.list_tasks(TAG_WORKDIR, self.tags[TAG_WORKDIR], view="BASIC")
            if t.get("state") in NON_TERMINAL and (t.get("tags") or {}).get(TAG_RUN) not in keep
        ]
        for task_id in stale:
            self._cancel_id(task_id)
        return len(stale)

    # ------------------------------------------------------------------ submit

    def submit(self, task: TaskSpec) -> str:
        if self._closing:
            raise CrankError("crank is shutting down")
        base = f"{task.job_id}-{task.attempt}"
        with self._lock:
            n = 0
            handle = base
            while handle in self._subs:
                n += 1
                handle = f"{base}-r{n}"
            sub = _Submission(
                handle=handle, task=task, tag=f"{self.run_id}:{handle}",
                key=f"runs/{self.run_id}/{handle}",
            )
            self._subs[handle] = sub
        sub.future = self._pool.submit(self._stage_and_create, sub)
        return handle

    def _stage_and_create(self, sub: _Submission) -> None:
        try:
            staged = self._stage(sub.task)
            sub.digests = tuple(s.digest for s in staged)
            tags = {**self.tags, TAG_JOB: f"{sub.task.job_id}-{sub.task.attempt}",
                    TAG_RULE: sub.task.label, TAG_SUBMISSION: sub.tag}
            body = task_body(to_tes_task(sub.task, staged, self.store.url(sub.key), tags))
            if sub.canceled or self._closing:
                return
            sub.tes_id = self._create(body, sub.tag)
            sub.created_at = time.monotonic()
            if sub.canceled or self._closing:
                self._cancel_id(sub.tes_id)
        except CrankError as e:
            sub.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported as the task's failure, one line
            sub.error = f"staging failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _stage(self, task: TaskSpec) -> List[layout.Staged]:
        staged: List[layout.Staged] = []
        # Snakemake checks a job's inputs before it hands the job over; a local path missing
        # here is a workflow source it lists but nothing made (e.g. a wrapper's
        # environment.yaml): on Docker a missing path is simply not there either
        local = [i for i in task.inputs if not i.url and os.path.lexists(i.path)]
        for i in task.inputs:
            if i.url:
                staged.append(layout.Staged(i.path, i.url, layout.url_digest(i.url),
                                            directory=i.kind is Kind.DIRECTORY))
        # an update() output is changed in place: its old content goes in too, as a copy
        updated = [o.path for o in task.outputs if o.update and os.path.lexists(o.path)]
        paths = [i.path for i in local] + updated
        if paths:
            for f in self.stager.stage(paths):
                digest = f.url.rsplit("/", 1)[-1]
                writable = any(under(f.path, u) for u in updated)
                staged.append(layout.Staged(f.path, f.url, digest, link=f.link, writable=writable))
        return staged

    def _create(self, body: Mapping[str, Any], tag: str) -> str:
        """POST the task; after an answer that may hide a created task, look it up by its
        submission tag before posting again, so a retry never makes a second task."""
        delay = 0.5
        unsure = False  # an earlier attempt may have created the task
        for attempt in range(CREATE_ATTEMPTS):
            try:
                if unsure:
                    if self._closing:  # a task the lost answer hid is canceled by close()
                        raise CrankError("the run ended before the task was created")
                    found = self.list_tasks(TAG_SUBMISSION, tag, view="BASIC", bounded=True)
                    if found:
                        return found[0]["id"]
                answer = self.http.request("POST", "/v1/tasks", "create", body=body, retry_reads=False)
                return answer["id"]
            except HttpError as e:
                raise CrankError(f"the TES server refused the task: {e}") from None
            except Throttled as e:
                # the server did nothing: wait as it asked (within reason), then go on
                wait = min(e.retry_after or delay, CREATE_WAIT_MAX_S)
            except BackendUnavailable:
                unsure = True
                wait = delay
            if attempt + 1 == CREATE_ATTEMPTS:
                raise
            time.sleep(wait)
            delay = min(delay * 2, 8)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ status

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        subs = [self._subs[h] for h in handles if h in self._subs]
        listed: Dict[str, str] = {}
        if any(s.tes_id for s in subs):
            try:
                tasks = self.list_tasks(TAG_RUN, self.run_id, bounded=True)
            except HttpError as e:
                # final (credentials refused, wrong URL): these tasks cannot be followed
                self._lose_sight(subs, e)
                tasks = []
            listed = {t.get("id"): t.get("state") or "UNKNOWN" for t in tasks}
        now = time.monotonic()
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
                states[h] = STATES.get(sub.last_state, State.QUEUED)
            elif now - (sub.created_at or now) < APPEAR_GRACE_S:
                states[h] = State.QUEUED
            else:
                states[h] = State.LOST
        return states

    def _lose_sight(self, subs: Sequence[_Submission], error: HttpError) -> None:
        """Fail the created tasks with the server's refusal, once; cancel them if it lets."""
        for sub in subs:
            if sub.tes_id and sub.error is None:
                sub.error = f"crank cannot follow task {sub.tes_id} any more: {error}"
                try:
                    self._cancel_id(sub.tes_id)
                except CrankError:
                    pass  # refused too: shutdown and the next start try again

    def stop(self, handle: str) -> None:
        sub = self._subs.get(handle)
        if sub is None:
            return
        sub.canceled = True
        if sub.tes_id:
            self._cancel_id(sub.tes_id)

    # ------------------------------------------------------------------ results

    def get_task(self, task_id: str) -> Mapping[str, Any]:
        return self.http.request(
            "GET", f"/v1/tasks/{task_id}", "get", params={"view": "FULL"}, **BOUNDED
        )

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        sub = self._subs.get(handle)
        if sub is None:
            return TaskResult(ok=False, reason="crank lost track of this task")
        if sub.error is not None:
            return TaskResult(ok=False, reason=sub.error)
        if sub.tes_id is None:
            return TaskResult(ok=False, reason="canceled before it was created on the TES server")
        try:
            full = self.get_task(sub.tes_id)
        except HttpError as e:
            if e.status == 404 and time.monotonic() - (sub.created_at or 0) < APPEAR_GRACE_S:
                raise BackendUnavailable(f"task {sub.tes_id} not found yet") from None
            raise CrankError(f"{task.label}: the TES server lost task {sub.tes_id} ({e})") from None
        state = full.get("state") or "UNKNOWN"
        logs = full.get("logs") or []
        last = logs[-1] if logs else {}
        exec_logs = last.get("logs") or []
        exec_log = exec_logs[-1] if exec_logs else {}
        tes_code = exec_log.get("exit_code")
        seconds = seconds_between(exec_log.get("start_time"), exec_log.get("end_time"))
        system = [line for entry in (last.get("system_logs") or []) for line in str(entry).splitlines()]
        tmp = self._download(sub, task) if state == "COMPLETE" else self._download_logs(sub)
        try:
            stdout, stderr = (os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")) if tmp else ("", "")
            files, tail = save_logs(
                task,
                _read(stdout) if tmp and os.path.exists(stdout) else _text(exec_log.get("stdout")),
                _read(stderr) if tmp and os.path.exists(stderr) else _text(exec_log.get("stderr")),
            )
            if state != "COMPLETE":
                if state == "SYSTEM_ERROR":
                    # perhaps an input removed from the store meanwhile: a retry of the job
                    # looks its inputs up again instead of trusting this run's memory
                    self.stager.forget(sub.digests)
                reason = f"TES state {state}"
                if system:
                    reason += ": " + system_summary(system)
                return TaskResult(ok=False, exit_code=tes_code, reason=reason, stderr_tail=tail,
                                  log_files=files, seconds=seconds)
            code = _exit_code(tmp)
            if code is None:
                return TaskResult(ok=False, exit_code=tes_code,
                                  reason="the task came back without its exit code (TES state COMPLETE)",
                                  stderr_tail=tail, log_files=files, seconds=seconds)
            # a failed job's own log files come back too (run.sh collected only those)
            self._install(tmp, task, None if code == 0 else layout.log_names(task))
            return TaskResult(ok=code == 0, exit_code=code, stderr_tail=tail, log_files=files,
                              seconds=seconds)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, sub: _Submission, task: TaskSpec) -> str:
        """Everything the task uploaded, in a fresh local directory (whole or nothing); the
        outputs a later task reads are also put under their content address."""
        os.makedirs(self.tmp_root, exist_ok=True)
        dest = os.path.join(self.tmp_root, sub.handle)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        share = {layout.product_name(n) for n, p in enumerate(task.products) if p.read_later}
        self.fetcher.fetch_dir(sub.key, dest, share)
        return dest

    def _download_logs(self, sub: _Submission) -> Optional[str]:
        """stdout/stderr of a task that did not complete, where the server uploaded them
        (Funnel uploads nothing after a failed executor)."""
        objects = dict(self.fetcher.store.list(sub.key))
        wanted = [n for n in ("stdout", "stderr", layout.EXIT) if f"{sub.key}/{n}" in objects]
        if not wanted:
            return None
        dest = tempfile.mkdtemp(prefix=f"{sub.handle}.", dir=_mkdirs(self.tmp_root))
        for name in wanted:
            key = f"{sub.key}/{name}"
            self.fetcher.fetch_file(key, os.path.join(dest, name), objects[key])
        return dest

    def _install(self, tmp: str, task: TaskSpec, only: Optional[Collection[str]] = None) -> None:
        """Move every product the task made (of the names in ``only``, when given) into
        place (each by rename, or copy to a temporary name beside it and rename when it is on
        another file system)."""
        try:
            with open(os.path.join(tmp, layout.INDEX)) as f:
                kinds, subdirs = layout.read_index(f.read())
        except FileNotFoundError:
            kinds, subdirs = {}, {}
        for n, product in enumerate(task.products):
            name = layout.product_name(n)
            kind = kinds.get(name)
            if kind is None or (only is not None and name not in only):
                continue  # not made: Snakemake reports missing outputs itself
            src = os.path.join(tmp, name)
            if kind == "d":
                os.makedirs(src, exist_ok=True)
                for sub in subdirs.get(name, []):
                    os.makedirs(os.path.join(src, sub), exist_ok=True)
            _place(src, product.path)

    def release(self, handles: Sequence[str]) -> None:
        for h in handles:
            sub = self._subs.pop(h, None)
            if sub is None or self._closing:
                continue
            if sub.tes_id and sub.last_state in NON_TERMINAL:
                # a chain that failed while its task still ran: the task must not outlive it
                self._pool.submit(self._cancel_quietly, sub.tes_id)
            if not self.options.keep_run_objects:
                self._pool.submit(self._delete_objects, sub.key)

    def _cancel_quietly(self, task_id: str) -> None:
        try:
            self._cancel_id(task_id)
        except CrankError:
            pass  # the run's shutdown cancels what is still running

    def _delete_objects(self, key: str) -> None:
        try:
            for k, _ in self.store.list(key):
                self.store.delete(k)
        except CrankError:
            pass  # left for a lifecycle rule; never worth failing a job

    # ------------------------------------------------------------------ cancel

    def _cancel_id(self, task_id: str) -> None:
        try:
            self.http.request("POST", f"/v1/tasks/{task_id}:cancel", "cancel", **BOUNDED)
        except HttpError as e:
            if e.status != 404:
                raise CrankError(f"the TES server refused to cancel task {task_id}: {e}") from None

    def cancel(self, handles: Sequence[str]) -> None:
        for h in handles:
            sub = self._subs.get(h)
            if sub is None:
                continue
            sub.canceled = True
            if sub.tes_id and (sub.last_state is None or sub.last_state in NON_TERMINAL):
                self._cancel_id(sub.tes_id)

    def close(self) -> None:
        self._closing = True
        try:
            for sub in list(self._subs.values()):
                sub.canceled = True
            self.stager.stop()  # inputs still uploading are abandoned, not awaited
            self._pool.shutdown(wait=True, cancel_futures=True)
            for t in self.list_tasks(TAG_RUN, self.run_id, view="BASIC", bounded=True):
                if t.get("state") in NON_TERMINAL:
                    self._cancel_id(t["id"])
        finally:
            self.stager.close()
            self.fetcher.close()
            if self.stager.stats.files:
                self.report(self.stager.summary())
            self.http.close()
            shutil.rmtree(self.tmp_root, ignore_errors=True)


def with_tag(tasks: Iterable[Mapping[str, Any]], key: str, value: str) -> List[Mapping[str, Any]]:
    """The tasks whose tag ``key`` is ``value``, checked on the client."""
    return [t for t in tasks if isinstance(t, Mapping) and (t.get("tags") or {}).get(key) == value]


def system_summary(lines: Sequence[str], limit: int = 3) -> str:
    """The server's own error lines (Funnel: logfmt with level='error'), else its last lines."""
    errors = [line for line in lines if "level='error'" in line or 'level="error"' in line
              or "level=error" in line]
    chosen = (errors or list(lines))[-limit:]
    return " | ".join(line if len(line) <= 300 else line[:297] + "..." for line in chosen)


def _mkdirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _read(path: str) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _text(value: Optional[str]) -> Iterable[bytes]:
    return [value.encode()] if value else []


def _exit_code(tmp: Optional[str]) -> Optional[int]:
    try:
        with open(os.path.join(tmp, layout.EXIT)) as f:
            return int(f.read().strip())
    except (OSError, ValueError, TypeError):
        return None


def _place(src: str, dest: str) -> None:
    """Put ``src`` (file or directory) at ``dest`` atomically, replacing what is there."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    try:
        _replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:  # another file system
            raise CrankError(f"cannot put an output at {dest}: {e.strerror}") from None
        tmp = os.path.join(parent, f".{os.path.basename(dest)}.crank-{os.getpid()}-{threading.get_ident()}")
        if os.path.isdir(src):
            shutil.copytree(src, tmp, symlinks=True)
        else:
            shutil.copy2(src, tmp)
        _replace(tmp, dest)


def _replace(src: str, dest: str) -> None:
    if os.path.isdir(src) and os.path.isdir(dest) and not os.path.islink(dest):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.crank-old-", dir=os.path.dirname(dest))
        os.rename(dest, os.path.join(old, "d"))
        os.rename(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.replace(src, dest)
