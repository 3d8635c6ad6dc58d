"""The Docker backend: each task is a container on a local or remote Docker engine, its
own (cold.py) or, where that is safe, a warm runner it is exec'd in (warm.py). This is
the one place that tells the two kinds of handle apart."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Collection, List, Mapping, Optional, Sequence, Tuple

from ...task import Adopted, Capacity, State, TaskResult, TaskSpec, script_fits_argv
from ..adoption import Adoption, Orphan, Orphans
from . import cold, engine, left_execs, scratch
from .left_execs import TakenExecs
from .cold import ColdContainers
from .engine import (LABEL_JOB, LABEL_KEY, LABEL_PRODUCTS, LABEL_RUN, LABEL_WORKDIR,
                     DockerOptions)
from .images import Images
from .warm import PREFIX, WarmPool


class DockerBackend:
    def __init__(
        self, run_id: str, workdir: str, options: DockerOptions = DockerOptions(),
        report: Optional[Callable[[str], None]] = None,
    ):
        self.run_id = run_id
        self.workdir = workdir
        self.options = options
        self.client, self._capacity = engine.connect(options)
        self.api = self.client.api
        self.report = report or (lambda line: None)
        self.images = images = Images(self.api, options.pull, self.report, options.hints.tolerance)
        self.cold = ColdContainers(self.api, run_id, workdir, options, images, self.report)
        self.warm: Optional[WarmPool] = None
        if options.warm:
            # the pool's threads use clients of their own
            self.warm = WarmPool(
                self.cold, lambda pool_size: engine.client(options, max_pool_size=pool_size).api,
                images, options, run_id, workdir,
            )
        self.taken_execs = TakenExecs(self.api)
        # what dead runs left, until adopted or canceled: ("cold", container id) or
        # ("warm", adopted.LeftExec); and their runners' directories
        self.adoption: Adoption = Adoption(self)
        self._dead_roots: List[str] = []

    def capacity(self) -> Capacity:
        return self._capacity

    def check_host_config(self) -> None:
        engine.check_host_config(self.api, self.options)

    def check_network(self) -> None:
        engine.check_network(self.api, self.options.network, self.options.hints)

    def check_files(self) -> None:
        """Whether the engine sees this machine's workdir, asked now where it can be."""
        self.cold.sharing.check_at_start()

    def command_for(self, task: TaskSpec) -> Tuple[str, ...]:
        """The argv of the task's own container (cold.py)."""
        return self.cold.command_for(task)

    def gather_orphans(self, live_runs: Collection[str], dead_runs: Collection[str]) -> Tuple[int, int]:
        """Keep the dead runs' tasks that can be adopted: containers of their own with
        their labels, warm tasks with their runners' records (left_execs.py); remove the
        other containers and runners' directories of runs that are gone."""
        keep = {self.run_id, *live_runs}
        rows = engine.containers(self.api, LABEL_WORKDIR, self.workdir)
        others = [row for row in rows if engine.foreign(row, self.workdir)]
        if others:
            self.report(f"{len(others)} container(s) on the Docker engine come from another directory "
                        "at this path (another machine or user); left alone")
            rows = [row for row in rows if row not in others]
        present = {row["Id"] for row in rows}
        found: List[Orphan] = []
        spared = set()
        for run, root in scratch.roots_of(self.workdir, self.options.base_url):
            if run in keep:
                continue
            left = [e for e in left_execs.left_execs(root) if e.runner in present] if run in dead_runs else []
            for e in left:
                found.append(Orphan(e.key, e.products, ("warm", e), finished=e.exit_code() is not None,
                                    started=e.started))
                spared.add(e.runner)
            if left:
                self._dead_roots.append(root)
            else:
                scratch.rmtree(root)
        stale = []
        for row in rows:
            labels = row.get("Labels") or {}
            if labels.get(LABEL_RUN) in keep or row["Id"] in spared:
                continue
            if (labels.get(LABEL_RUN) in dead_runs and labels.get(LABEL_KEY) and labels.get(LABEL_JOB)
                    and row.get("State") in ("running", "exited")):
                # started as soon as created
                found.append(Orphan(labels[LABEL_KEY], labels.get(LABEL_PRODUCTS, ""), ("cold", row["Id"]),
                                    finished=row.get("State") != "running", started=row.get("Created")))
            else:
                stale.append(row["Id"])
        self.cold.cancel(stale)
        self.cold.mirror.remove_left_volumes()  # the copies of the workdir that dead runs left
        self.adoption.orphans = Orphans(found)
        # the scripts of runs that are gone: an adopted container may still read its own,
        # so they go when this run ends, with its own
        with contextlib.suppress(OSError):
            for entry in os.scandir(cold.scripts_root(self.workdir)):
                if entry.name not in keep:
                    self.cold.script_dirs.add(entry.path)
        return len(stale), len(found)

    def adopt(self, task: TaskSpec) -> Optional[Adopted]:
        return self.adoption.adopt(task)

    def cancel_orphans(self) -> int:
        return self.adoption.cancel_rest()

    # what adoption.Adoption asks of its source

    def orphan_key(self, task: TaskSpec) -> str:
        return self.images.key(task)

    def take_orphan(self, orphan: Orphan, task: TaskSpec) -> str:
        kind, ref = orphan.ref
        if kind == "cold":
            self.cold.take(ref)
            return ref
        return self.taken_execs.take(ref)

    def drop_orphans(self, orphans: Sequence[Orphan], quietly: bool) -> int:
        for orphan in orphans:
            kind, ref = orphan.ref
            if kind == "cold":
                self.cold.cancel([ref])
            else:
                left_execs.remove_runner(self.api, ref)
        return len(orphans)

    def submit(self, task: TaskSpec) -> str:
        self.adoption.stop_other_versions(task)
        # a script too long for argv goes as a file: containers of its own (command_for)
        if self.warm is not None and script_fits_argv(task.script):
            handle = self.warm.try_submit(task)
            if handle is not None:
                return handle
        return self.cold.submit(task)

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        taken, warm, cold = _split(handles)
        states = dict(self.warm.poll(warm)) if warm else {}  # answered from memory
        if taken:
            states.update(self.taken_execs.poll(taken))
        if cold or not warm:  # the rest with the one list request
            states.update(self.cold.poll(cold))
        return states

    def stop(self, handle: str) -> None:
        if _is_taken(handle):
            return self.taken_execs.stop(handle)
        if _is_warm(handle):
            return self.warm.stop(handle)
        self.cold.stop(handle)

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        if _is_taken(handle):
            return self.taken_execs.result(handle, task)
        if _is_warm(handle):
            return self.warm.result(handle, task)
        return self.cold.result(handle, task)

    def release(self, handles: Sequence[str]) -> None:
        taken, warm, cold = _split(handles)
        self.taken_execs.remove(taken)
        if warm:
            self.warm.release(warm)
        self.cold.cancel(cold)

    def cancel(self, handles: Sequence[str]) -> None:
        taken, warm, cold = _split(handles)
        self.taken_execs.remove(taken)
        if warm:
            self.warm.cancel(warm)
        self.cold.cancel(cold)

    def interrupt(self) -> None:
        pass  # image pulls run on daemon threads (images.Images): nothing waits for them

    def close(self, detach: bool = False) -> None:
        if self.warm is not None:
            self.warm.close(detach)
        try:
            if not detach:
                self.taken_execs.remove_all()
                if not self.adoption:  # else kept for the run that adopts or cancels them
                    for root in self._dead_roots:
                        scratch.rmtree(root)
            self.cold.close(detach)
        finally:
            self.client.close()


def _is_taken(handle: str) -> bool:
    return handle.startswith(left_execs.PREFIX)


def _is_warm(handle: str) -> bool:
    return handle.startswith(PREFIX)


def _split(handles: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
    """(adopted warm tasks' handles, warm handles, container handles)"""
    taken = [h for h in handles if _is_taken(h)]
    warm = [h for h in handles if _is_warm(h)]
    return taken, warm, [h for h in handles if not (_is_taken(h) or _is_warm(h))]
