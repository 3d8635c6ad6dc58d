"""Whether the Docker engine sees the client's files: only then may a task's paths be
bind-mounted (``--crank-docker-files``). An engine on another machine, or in other mounts,
may have nothing at the workdir's path, or a directory of that name that holds other files;
a bind mount would then run the job on that machine's files.

The proof is asked of the engine itself, in a container that is created and never started,
once per run for the workdir and once per path outside it: a file with a fresh random name
that the client wrote must be there at its path, under the workdir and in each mount point
below it (a file system this machine mounts there), and in each directory outside the workdir
that a job writes to; each file and directory a job reads outside the workdir must be there
with the client's kind, size and modification time to the nanosecond. Where the proof fails,
a task's files are copied instead (copying.py), or, when the user asked for binding, the run
stops with why.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import docker
import docker.errors

from ...errors import BackendUnavailable, CrankError
from ...staging import tree
from ...task import TaskSpec
from ..paths import under
from . import engine
from .engine import GO_DIR, GO_LINK, LABEL_PROBE, DockerOptions, engine_errors
from .mounts import plan_mounts

AUTO, BIND, COPY = "auto", "bind", "copy"
# files and directories outside the workdir proven for one task at most, one request each
PROVE_AT_MOST = 2000


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
        outside = [(path, writable) for path, writable in self.mounts(task) if not under(path, self.workdir)]
        if not outside:
            return False
        # a directory the job writes to is proven by a file written there; what it reads, entry
        # by entry (a directory's time does not change when a file in it is rewritten)
        wanted: Dict[str, Optional[Tuple]] = {path: None for path, writable in outside if writable}
        wanted.update(self._read_outside(task))
        unknown = {path: known for path, known in wanted.items() if path not in self._paths}
        if unknown:
            with probes_in([path for path in unknown if unknown[path] is None]) as probes:
                asked = {probes.get(path, path): known for path, known in unknown.items()}
                seen = self._seen(task.image, [path for path, _ in outside], asked)
            self._paths.update({path: seen[probes.get(path, path)] for path in unknown})
        missing = [path for path in wanted if not self._paths[path]]
        if missing and self.options.files == BIND:
            raise CrankError(
                f"{task.label}: the Docker engine at {engine.where(self.options)} does not see this "
                f"machine's {missing[0]} (it has another file there, or none); use "
                f"{self.options.hints.files} auto or copy, or an engine on this machine")
        return bool(missing)

    @staticmethod
    def mounts(task: TaskSpec):
        return plan_mounts(task.workdir, [i.path for i in task.inputs], [o.path for o in task.products])

    def _read_outside(self, task: TaskSpec) -> Dict[str, Optional[Tuple]]:
        """Each file and directory the task reads outside the workdir (also through a link),
        with what the engine must show there: (kind, size, mtime_ns); more than PROVE_AT_MOST
        count as one that cannot be proven."""
        real_workdir = os.path.realpath(self.workdir)
        paths = [i.path for i in task.inputs if not i.url and os.path.lexists(i.path)
                 and not under(os.path.realpath(i.path), real_workdir)]
        if not paths:
            return {}
        try:
            entries = [e for e in tree.plan(paths).entries
                       if e.kind != tree.LINK and not under(e.path, self.workdir)]
        except CrankError:
            return {}  # said when the task is made
        if len(entries) > PROVE_AT_MOST:
            return {entries[0].path: ("too many", 0, 0)}
        return {e.path: (e.kind, e.st.st_size if e.st else None, e.mtime_ns) for e in entries}

    def _check_workdir(self, image: str) -> None:
        """The probe under the workdir, and one in each mount point below it (a file system
        this machine mounts there may not be the engine's), must be seen by the engine."""
        points = mount_points_under(self.workdir)
        with probes_in(points) as probes:
            asked = {self.probe(): None, **{probes[point]: None for point in points}}
            seen = self._seen(image, [self.workdir], asked)
        unseen = [self.workdir] if not seen[self.probe()] else [p for p in points if not seen[probes[p]]]
        shared = not unseen
        at = engine.where(self.options)
        if not shared and self.options.files == BIND:
            # left unknown: every later task is refused the same way, never copied
            where = unseen[0]
            raise CrankError(
                f"the Docker engine at {at} does not see this machine's {where} (a file crank "
                "wrote there is missing on the engine's side): it runs on another machine or in other "
                f"mounts; use {self.options.hints.files} copy (or auto), or an engine on this machine")
        self.workdir_shared = shared
        if shared:
            return
        self.report(f"the Docker engine at {at} does not see this machine's {self.workdir}: each job's "
                    "files are copied into its container and what it made is copied back")

    def _seen(self, image: str, binds: Sequence[str], wanted: Dict[str, Optional[Tuple]]) -> Dict[str, bool]:
        """For each wanted path, whether the engine shows it as the client has it (None: that it
        is there), asked through one container that binds ``binds`` (read-only) and never
        starts; a bind source the engine lacks fails them all."""
        name = f"crank-{self.run_id[:8]}-probe-{uuid.uuid4().hex[:8]}"
        mounts = [docker.types.Mount(target=p, source=p, type="bind", read_only=True)
                  for p in _outermost(binds)]
        try:
            with engine_errors("creating a container"):
                cid = self.api.create_container(
                    image=image, command=["/crank-probe"], name=name, network_disabled=True,
                    labels={**engine.labels(self.run_id, "", self.workdir), LABEL_PROBE: "1"},
                    host_config=self.api.create_host_config(mounts=mounts))["Id"]
        except docker.errors.APIError as e:
            if "bind source path does not exist" in str(e) or "not a directory" in str(e):
                return {p: False for p in wanted}
            raise CrankError(f"Docker refused a container to check what it sees of this machine "
                             f"({engine.short(e)})") from None
        try:
            return {p: self._same(cid, p, known) for p, known in wanted.items()}
        finally:
            engine.remove_container(self.api, cid)

    def _same(self, cid: str, path: str, known: Optional[Tuple]) -> bool:
        there = engine.path_stat(self.api, cid, path) if not path.endswith("/") else None
        if there is None or known is None:
            return there is not None
        kind, size, mtime_ns = known
        mode = there.get("mode", 0)
        kind_there = tree.DIR if mode & GO_DIR else tree.LINK if mode & GO_LINK else tree.FILE
        if kind_there != kind or engine.stat_mtime_ns(there) != mtime_ns:
            return False
        return kind != tree.FILE or there.get("size") == size


@contextlib.contextmanager
def probes_in(directories: Sequence[str]) -> Iterator[Dict[str, str]]:
    """A new file with a fresh random name in each directory (one that cannot be written gets
    a path that never exists: it cannot be proven), removed afterwards."""
    probes, made = {}, []
    try:
        for directory in directories:
            probe = os.path.join(directory, f".crank-probe-{uuid.uuid4().hex}")
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                made.append(probe)
            except OSError:
                probe += "/"
            probes[directory] = probe
        yield probes
    finally:
        for probe in made:
            with contextlib.suppress(OSError):
                os.unlink(probe)


def mount_points_under(directory: str) -> List[str]:
    """The mount points of this machine strictly below ``directory`` (Linux; none elsewhere)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point != directory and under(point, directory):
                found.append(point)
    return sorted(set(found))


def _outermost(paths: Sequence[str]) -> Tuple[str, ...]:
    """The paths not under another one of them: binding those shows them all."""
    kept: list = []
    for path in sorted(set(paths)):
        if not kept or not under(path, kept[-1]):
            kept.append(path)
    return tuple(kept)
