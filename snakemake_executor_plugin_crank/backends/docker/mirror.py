"""The engine's own copy of the workdir, for tasks whose files are copied (copying.py): a
volume that each of the run's copied containers mounts at the workdir's path. A file is sent
to the engine once per run however many jobs read it, and what a job made is there for the
jobs after it without a trip through the client.

crank keeps what the volume holds (path -> what the file was on the client when it was sent,
or when it came back as a product) and sends a file again only when the client's changed.
Files go in through a holder: a container that mounts the volume, created and never started
(the archive API works on it). A task's products are removed in its own container before its
command runs (launch.py), as Snakemake removed them on the client, and sent again when the
task updates them. What lies outside the workdir goes into each container itself.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, List, Optional, Sequence

import docker
import docker.errors

from ...errors import CrankError
from ...staging import tree
from ...task import Kind, TaskSpec
from ..paths import under
from . import copying, engine
from .engine import LABEL_WORKDIR, engine_errors

LABEL_MIRROR = "crank.mirror"


class Mirror:
    """The volume of one run on one engine, made at the first task that needs it."""

    def __init__(self, api, run_id: str, workdir: str):
        self.api = api
        self.run_id = run_id
        self.workdir = workdir
        self.volume = f"crank-files-{run_id}"
        self.holder: Optional[str] = None
        self.held: Dict[str, Any] = {}
        self.lock = threading.Lock()  # warm runners' tasks send from several threads

    def mount(self, image: str) -> docker.types.Mount:
        """The volume at the workdir's path, for a container of the task's ``image``."""
        with self.lock:
            self._open(image)
        return docker.types.Mount(target=self.workdir, source=self.volume, type="volume")

    def send(self, task: TaskSpec, entries: Sequence[tree.Entry]) -> List[tree.Entry]:
        """Put in the volume what the task needs under the workdir (``entries``:
        copying.plan_files) that it does not hold as the client has it, with the directories
        on the way; the rest (outside the workdir, and the directories above it), which goes
        into the task's container itself."""
        everything = copying.with_ancestors(task, entries)
        inside = [e for e in everything if under(e.path, self.workdir)]
        known = {e.path: copying.identity(e) for e in inside if e.kind != tree.DIR}
        with self.lock:
            self._open(task.image)
            for product in task.products:  # removed, or rewritten, in the task's container
                self._forget(product.path, product.kind is Kind.DIRECTORY)
            fresh = [e for e in inside if e.kind == tree.DIR or self.held.get(e.path) != known[e.path]]
            engine.put_files(self.api, self.holder, copying.stream(fresh))
            self.held.update(known)
        return [e for e in everything if not under(e.path, self.workdir)]

    def took(self, task: TaskSpec) -> None:
        """The task's products came back: the volume holds what the client now has."""
        made = [p.path for p in task.products if under(p.path, self.workdir)]
        entries = tree.plan(made, missing_ok=True).entries
        with self.lock:
            self.held.update((e.path, copying.identity(e)) for e in entries if e.kind != tree.DIR)

    def _forget(self, path: str, directory: bool) -> None:
        self.held.pop(path, None)
        prefix = path.rstrip("/") + "/"
        if directory:
            self.held = {p: known for p, known in self.held.items() if not p.startswith(prefix)}

    def _open(self, image: str) -> None:
        if self.holder is not None:
            return
        labels = {**engine.labels(self.run_id, "", self.workdir), LABEL_MIRROR: self.run_id}
        self._remove_left_volumes()
        try:
            with engine_errors("creating a volume"):
                self.api.create_volume(self.volume, labels=labels)
            with engine_errors("creating a container"):
                self.holder = self.api.create_container(
                    image=image, command=["/crank-holds-files"], name=f"crank-{self.run_id[:8]}-files",
                    network_disabled=True, labels=labels,
                    host_config=self.api.create_host_config(mounts=[
                        docker.types.Mount(target=self.workdir, source=self.volume, type="volume")]),
                )["Id"]
        except docker.errors.APIError as e:
            raise CrankError(f"Docker refused the volume that holds the run's files on the engine "
                             f"({engine.short(e)})") from None

    def _remove_left_volumes(self) -> None:
        """Volumes that runs at this workdir left (they ended with --crank-detach, or were
        killed) and that no container uses any more."""
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            with engine_errors("listing volumes"):
                left = self.api.volumes(filters={"label": f"{LABEL_WORKDIR}={self.workdir}",
                                                 "dangling": True}).get("Volumes") or []
            for volume in left:
                if LABEL_MIRROR in (volume.get("Labels") or {}):
                    with contextlib.suppress(docker.errors.APIError), engine_errors("removing a volume"):
                        self.api.remove_volume(volume["Name"])

    def close(self) -> None:
        """Remove the holder, then the volume unless a container still uses it (one left
        running for a later run to adopt)."""
        if self.holder is None:
            return
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            engine.remove_container(self.api, self.holder)
            with engine_errors("removing a volume"):
                self.api.remove_volume(self.volume)
        self.holder = None

