"""Whether the Docker engine sees the client's files: only then may a task's paths be
bind-mounted (``--crank-docker-files``). An engine on another machine, or in other mounts,
may have nothing at the workdir's path, or a directory of that name that holds other files;
a bind mount would then run the job on that machine's files.

The proof is asked of the engine itself, in a container that is created and never started:
a file with a fresh random name that the client wrote under the workdir (the probe) must be
there at its path, and a bind-mounted path outside the workdir must be there with the
client's kind, size and modification time (to the nanosecond). Each is asked once per run.
Where the proof fails, a task's files are copied instead (copying.py), or, when the user
asked for binding, the run stops with why.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Callable, Dict, Optional, Sequence, Tuple

import docker
import docker.errors

from ...errors import BackendUnavailable, CrankError
from ...task import TaskSpec
from ..paths import under
from . import engine
from .engine import GO_DIR, GO_LINK, LABEL_PROBE, DockerOptions, engine_errors
from .mounts import plan_mounts

AUTO, BIND, COPY = "auto", "bind", "copy"


class Sharing:
    """Decides, task by task, whether its files are bound or copied."""

    def __init__(self, api, options: DockerOptions, run_id: str, workdir: str,
                 probe: Callable[[], str], report: Callable[[str], None]):
        self.api = api
        self.options = options
        self.run_id = run_id
        self.workdir = workdir
        self.probe = probe
        self.report = report
        self.workdir_shared: Optional[bool] = None if options.files != COPY else False
        self._paths: Dict[str, bool] = {}  # a bind source outside the workdir -> the engine has it

    def check_at_start(self) -> None:
        """Prove the workdir with any image the engine has; with none, or an engine that
        fails now (it may be restarting: the runner's tolerance covers that), at the first
        task."""
        if self.workdir_shared is not None:
            return
        try:
            with engine_errors("listing images"):
                images = self.api.images(quiet=True)
            if images:
                self._check_workdir(images[0])
        except BackendUnavailable:
            self.workdir_shared = None

    def copies(self, task: TaskSpec) -> bool:
        """Whether the task's files must be copied (its image is on the engine)."""
        if self.workdir_shared is None:
            self._check_workdir(task.image)
        if not self.workdir_shared:
            return True
        outside = [path for path, _ in self.mounts(task) if not under(path, self.workdir)]
        unknown = [path for path in outside if path not in self._paths]
        if unknown:
            self._paths.update(self._seen(task.image, unknown))
            # asked again one by one: a path the engine lacks fails the whole container, and a
            # directory that running jobs write to may have changed between the two looks
            for path in [path for path in unknown if not self._paths[path]]:
                self._paths.update(self._seen(task.image, [path]))
        missing = [path for path in outside if not self._paths[path]]
        if missing and self.options.files == BIND:
            raise CrankError(
                f"{task.label}: the Docker engine at {engine.where(self.options)} does not see this "
                f"machine's {missing[0]} (it has another file there, or none); use "
                f"{self.options.hints.files} auto or copy, or an engine on this machine")
        return bool(missing)

    @staticmethod
    def mounts(task: TaskSpec):
        return plan_mounts(task.workdir, [i.path for i in task.inputs], [o.path for o in task.products])

    def _check_workdir(self, image: str) -> None:
        probe = self.probe()
        self.workdir_shared = self._seen(image, [probe], exists_only=True)[probe]
        if self.workdir_shared:
            return
        at = engine.where(self.options)
        if self.options.files == BIND:
            raise CrankError(
                f"the Docker engine at {at} does not see this machine's {self.workdir} (a file crank "
                "wrote there is missing on the engine's side): it runs on another machine or in other "
                f"mounts; use {self.options.hints.files} copy (or auto), or an engine on this machine")
        self.report(f"the Docker engine at {at} does not see this machine's {self.workdir}: each job's "
                    "files are copied into its container and what it made is copied back")

    def _seen(self, image: str, paths: Sequence[str], exists_only: bool = False) -> Dict[str, bool]:
        """For each path, whether the engine sees it as the client has it, asked through one
        container that binds them all (read-only) and never starts."""
        name = f"crank-{self.run_id[:8]}-probe-{uuid.uuid4().hex[:8]}"
        mounts = [docker.types.Mount(target=p, source=p, type="bind", read_only=True)
                  for p in _outermost(paths)]
        try:
            with engine_errors("creating a container"):
                cid = self.api.create_container(
                    image=image, command=["/crank-probe"], name=name, network_disabled=True,
                    labels={**engine.labels(self.run_id, "", self.workdir), LABEL_PROBE: "1"},
                    host_config=self.api.create_host_config(mounts=mounts))["Id"]
        except docker.errors.APIError as e:
            if "bind source path does not exist" in str(e) or "not a directory" in str(e):
                return {p: False for p in paths}
            raise CrankError(f"Docker refused a container to check what it sees of this machine "
                             f"({engine.short(e)})") from None
        try:
            return {p: self._same(cid, p, exists_only) for p in paths}
        finally:
            engine.remove_container(self.api, cid)

    def _same(self, cid: str, path: str, exists_only: bool) -> bool:
        there = engine.path_stat(self.api, cid, path)
        if there is None or exists_only:
            return there is not None
        try:
            here = os.stat(path)  # a bind mount of a symlink shows what it leads to
        except OSError:
            return False
        mode = there.get("mode", 0)
        kind_there = "d" if mode & GO_DIR else "l" if mode & GO_LINK else "f"  # never "l" when it is shared
        kind_here = "d" if stat.S_ISDIR(here.st_mode) else "f"
        if kind_there != kind_here or engine.stat_mtime_ns(there) != here.st_mtime_ns:
            return False
        return kind_here != "f" or there.get("size") == here.st_size


def _outermost(paths: Sequence[str]) -> Tuple[str, ...]:
    """The paths not under another one of them: binding those shows them all."""
    kept: list = []
    for path in sorted(set(paths)):
        if not kept or not under(path, kept[-1]):
            kept.append(path)
    return tuple(kept)
