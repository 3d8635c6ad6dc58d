"""The Docker backend: each task is a container on a local or remote Docker engine, its
own (cold.py) or, where that is safe, a warm runner it is exec'd in (warm.py). This is
the one place that tells the two kinds of handle apart."""

from __future__ import annotations

from typing import Callable, Collection, List, Mapping, Optional, Sequence, Tuple

from ...task import Capacity, State, TaskResult, TaskSpec, script_fits_argv
from . import engine, scratch
from .cold import ColdRunner
from .engine import LABEL_RUN, LABEL_WORKDIR, DockerOptions, Images
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
        images = Images(self.api, options.pull, report or (lambda line: None),
                        options.hints.tolerance)
        self.cold = ColdRunner(self.api, run_id, workdir, options, images)
        self.warm: Optional[WarmPool] = None
        if options.warm:
            # the pool's threads use clients of their own
            self.warm = WarmPool(
                self.cold, lambda pool_size: engine.client(options, max_pool_size=pool_size).api,
                images, options, run_id, workdir,
            )

    def capacity(self) -> Capacity:
        return self._capacity

    def check_host_config(self) -> None:
        engine.check_host_config(self.api, self.options)

    def check_network(self) -> None:
        engine.check_network(self.api, self.options.network, self.options.hints)

    def command_for(self, task: TaskSpec) -> Tuple[str, ...]:
        """The argv of the task's own container (cold.py)."""
        return self.cold.command_for(task)

    def remove_orphans(self, live_runs: Collection[str]) -> int:
        """Remove the containers that dead runs in this workdir left behind (they crashed),
        then the warm runners' temporary directories of such runs (scratch.py)."""
        keep = {self.run_id, *live_runs}
        stale = [
            row["Id"]
            for row in engine.containers(self.api, LABEL_WORKDIR, self.workdir)
            if row.get("Labels", {}).get(LABEL_RUN) not in keep
        ]
        self.cold.cancel(stale)
        scratch.remove_stale_dirs(self.workdir, self.options.base_url, self.run_id, live_runs=keep)
        return len(stale)

    def submit(self, task: TaskSpec) -> str:
        # a script too long for argv goes as a file: containers of its own (command_for)
        if self.warm is not None and script_fits_argv(task.script):
            handle = self.warm.try_submit(task)
            if handle is not None:
                return handle
        return self.cold.submit(task)

    def poll(self, handles: Sequence[str]) -> Mapping[str, State]:
        warm, cold = _split(handles)
        states = dict(self.warm.poll(warm)) if warm else {}  # answered from memory
        if cold or not warm:  # the rest with the one list request
            states.update(self.cold.poll(cold))
        return states

    def stop(self, handle: str) -> None:
        if _is_warm(handle):
            return self.warm.stop(handle)
        self.cold.stop(handle)

    def result(self, handle: str, task: TaskSpec) -> TaskResult:
        if _is_warm(handle):
            return self.warm.result(handle, task)
        return self.cold.result(handle, task)

    def release(self, handles: Sequence[str]) -> None:
        warm, cold = _split(handles)
        if warm:
            self.warm.release(warm)
        self.cold.cancel(cold)

    def cancel(self, handles: Sequence[str]) -> None:
        warm, cold = _split(handles)
        if warm:
            self.warm.cancel(warm)
        self.cold.cancel(cold)

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()
        try:
            self.cold.close()
        finally:
            self.client.close()


def _is_warm(handle: str) -> bool:
    return handle.startswith(PREFIX)


def _split(handles: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(warm handles, container handles)"""
    warm = [h for h in handles if _is_warm(h)]
    return warm, [h for h in handles if not _is_warm(h)]
