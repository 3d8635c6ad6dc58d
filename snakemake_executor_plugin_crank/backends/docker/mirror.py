"""The engine's own copy of the workdir, for tasks whose files are copied (copying.py): a
volume that each of the run's copied containers mounts at the workdir's path. A file is sent
to the engine once per run however many jobs read it, and what a job made is there for the
jobs after it without a trip through the client.

crank keeps what the volume holds (path -> what the file was on the client when it was sent,
or when it came back as a product) and sends a file again only when the client's changed.
Files are sent in the same archive as the rest of the task's (copying.py), into its own
container, which writes them through its mount; a file on its way for one task is waited for
by another that needs it, never sent twice at once. Before a task is sent its files, what the
volume may hold at its products (an earlier attempt's, or an ``update()`` output's older
content) is removed by an exec in a holder, a container of the run that mounts the volume and
only waits, made when first needed; an ``update()`` output is then sent again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set

import docker
import docker.errors

from ...errors import CrankError
from ...staging import tree
from ...task import Kind, TaskSpec
from ..paths import under
from . import copying, engine, launch
from .engine import LABEL_ORIGIN, LABEL_WORKDIR, engine_errors

LABEL_MIRROR = "crank.mirror"
# the paths one removal in the holder names at most, in bytes (the argv's limit is far above)
REMOVE_AT_ONCE = 64 * 1024


@dataclass
class Claim:
    """What one task sends: ``inside`` into the volume (its entries are this task's to send:
    others wait for them), ``outside`` into the container itself."""

    inside: List[tree.Entry]
    outside: List[tree.Entry]
    known: Dict[str, Any] = field(default_factory=dict)  # what ``inside`` brings, by path
    sent: threading.Event = field(default_factory=threading.Event)


class Mirror:
    """The volume of one run on one engine, made at the first task that needs it."""

    def __init__(self, api, run_id: str, workdir: str):
        self.api = api
        self.run_id = run_id
        self.workdir = workdir
        self.volume = f"crank-files-{run_id}"
        self.labels = {**engine.labels(run_id, "", workdir), LABEL_MIRROR: run_id}
        self.user = f"{os.getuid()}:{os.getgid()}"
        self.made_volume = False
        self.holder: Optional[str] = None
        self.held: Dict[str, Any] = {}
        self.sending: Dict[str, threading.Event] = {}  # path -> the end of the claim sending it
        self.made: Set[str] = set()  # the products of the tasks sent: the volume may hold them
        self.lock = threading.Lock()  # warm runners' tasks send from several threads

    def mount(self) -> docker.types.Mount:
        """The volume at the workdir's path, made if it is not yet."""
        with self.lock:
            self._make_volume()
        return self._mount()

    def _mount(self) -> docker.types.Mount:
        # no_copy: an image's own files at the workdir's path must not fill the volume
        return docker.types.Mount(target=self.workdir, source=self.volume, type="volume", no_copy=True)

    def claim(self, task: TaskSpec, entries: Sequence[tree.Entry]) -> Claim:
        """What to send for the task (``entries``: copying.plan_files): what it needs under the
        workdir that the volume does not hold as the client has it, with the directories on
        the way, and the rest (outside the workdir, and the directories above it), after
        removing what the volume may hold at the task's products. The caller sends both in
        the task's container, then calls ``done``."""
        everything = copying.with_ancestors(task, entries)
        inside = [e for e in everything if under(e.path, self.workdir)]
        known = {e.path: copying.identity(e) for e in inside if e.kind != tree.DIR}
        products = [p for p in task.products if under(p.path, self.workdir)]
        outside = [e for e in everything if not under(e.path, self.workdir)]
        while True:
            with self.lock:
                busy = next((self.sending[p] for p in known if p in self.sending), None)
                if busy is None:
                    self._make_volume()
                    gone = [p.path for p in products if self._may_hold(p.path, p.kind is Kind.DIRECTORY)]
                    if gone:
                        self._remove(task.image, gone)
                    for product in products:
                        self._forget(product.path, product.kind is Kind.DIRECTORY)
                        self.made.add(product.path)
                    fresh = [e for e in inside if e.kind == tree.DIR or self.held.get(e.path) != known[e.path]]
                    claim = Claim(fresh, outside, {e.path: known[e.path] for e in fresh if e.kind != tree.DIR})
                    self.sending.update((path, claim.sent) for path in claim.known)
                    return claim
            busy.wait()  # another task sends a file this one needs: then look again

    def done(self, claim: Claim, sent: bool) -> None:
        """The claim's files were sent (``sent``), or may not have been."""
        with self.lock:
            if sent:
                self.held.update(claim.known)
            for path in claim.known:
                self.sending.pop(path, None)
        claim.sent.set()

    def took(self, task: TaskSpec) -> None:
        """The task's products came back: the volume holds what the client now has."""
        made = [p.path for p in task.products if under(p.path, self.workdir)]
        entries = tree.plan(made, missing_ok=True).entries
        with self.lock:
            self.held.update((e.path, copying.identity(e)) for e in entries if e.kind != tree.DIR)

    def _may_hold(self, path: str, directory: bool) -> bool:
        if path in self.made or path in self.held:
            return True
        prefix = path.rstrip("/") + "/"
        return directory and any(p.startswith(prefix) for p in self.held)

    def _forget(self, path: str, directory: bool) -> None:
        self.held.pop(path, None)
        if directory:
            prefix = path.rstrip("/") + "/"
            self.held = {p: known for p, known in self.held.items() if not p.startswith(prefix)}

    def _remove(self, image: str, paths: Sequence[str]) -> None:
        """Remove ``paths`` from the volume, by execs in the holder."""
        self._start_holder(image)
        batch: List[str] = []
        size = 0
        for path in paths:
            if batch and size + len(path) > REMOVE_AT_ONCE:
                self._exec_rm(batch)
                batch, size = [], 0
            batch.append(path)
            size += len(path) + 1
        if batch:
            self._exec_rm(batch)

    def _exec_rm(self, paths: Sequence[str]) -> None:
        for attempt in range(2):
            try:
                with engine_errors("removing files in the engine's copy of the workdir"):
                    code = engine.exit_code_of(self.api, self.holder, ["rm", "-rf", "--", *paths], self.user)
                break
            except docker.errors.APIError as e:
                if attempt or e.status_code != 409:  # 409: not running (the engine restarted)
                    raise CrankError(f"Docker refused to remove a job's old outputs in the engine's copy "
                                     f"of the workdir ({engine.short(e)})") from None
                with engine_errors("starting a container"):
                    self.api.start(self.holder)
        if code != 0:
            raise CrankError(f"could not remove {paths[0]} in the engine's copy of the workdir before its "
                             f"job (rm exited {code})")

    def _make_volume(self) -> None:
        if self.made_volume:
            return
        try:
            with engine_errors("creating a volume"):
                self.api.create_volume(self.volume, labels=self.labels)
        except docker.errors.APIError as e:
            raise CrankError(f"Docker refused the volume that holds the run's files on the engine "
                             f"({engine.short(e)})") from None
        self.made_volume = True

    def _start_holder(self, image: str) -> None:
        if self.holder is not None:
            return
        config = dict(
            image=image, command=["/bin/sh", "-c", launch.IDLE], name=f"crank-{self.run_id[:8]}-files",
            network_disabled=True, user=self.user, labels=self.labels,
            host_config=self.api.create_host_config(mounts=[self._mount()]),
        )
        try:
            with engine_errors("creating a container"):
                holder = engine.create_container(self.api, config)
            with engine_errors("starting a container"):
                self.api.start(holder)
        except docker.errors.APIError as e:
            raise CrankError(f"Docker refused the container that removes old outputs in the engine's "
                             f"copy of the workdir ({engine.short(e)})") from None
        self.holder = holder

    def remove_left_volumes(self) -> None:
        """Volumes that runs at this workdir (of this machine) left, which no container uses
        any more: the run ended with --crank-detach, or was killed."""
        wanted = {"label": [f"{LABEL_WORKDIR}={self.workdir}", f"{LABEL_ORIGIN}={self.labels[LABEL_ORIGIN]}",
                            LABEL_MIRROR], "dangling": True}
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            with engine_errors("listing volumes"):
                left = self.api.volumes(filters=wanted).get("Volumes") or []
            for volume in left:
                with contextlib.suppress(docker.errors.APIError), engine_errors("removing a volume"):
                    self.api.remove_volume(volume["Name"])

    def close(self) -> None:
        """Remove the holder, then the volume unless a container still uses it (one left
        running for a later run to adopt)."""
        with contextlib.suppress(CrankError, docker.errors.DockerException):
            if self.holder is not None:
                engine.remove_container(self.api, self.holder)
                self.holder = None
            if self.made_volume:
                with engine_errors("removing a volume"):
                    self.api.remove_volume(self.volume)
                self.made_volume = False
