"""A task's image on the Docker engine: present, or pulled on a thread of its own, its
refusals explained; and the engine's ID for it, which a task's adoption key counts."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from typing import Callable, Dict

import docker
import docker.errors

from ...daemon import in_background
from ...errors import BackendUnavailable, CrankError, ImageUnavailable, NotYet
from ...task import TaskSpec
from ..adoption import key_of, stat_identity
from .engine import engine_errors, short

# what the engine says when the registry answered that the image is not there for us
_REGISTRY_REFUSALS = (
    "not found", "manifest unknown", "name unknown", "pull access denied", "unauthorized",
    "denied:", "repository does not exist",
)

class Images:
    """Makes sure a task's image is on the engine (looked up once, pulled as the options
    say); refusals are explained, a registry out of reach is said once per image.

    A pull runs on a thread of its own, never on the caller's (Snakemake's scheduler, or
    its status loop): until it ends, ``ensure`` raises NotYet and the runner asks again at
    its next round. The thread is a daemon, so Ctrl-C never waits for a registry."""

    def __init__(self, api, pull: str, report: Callable[[str], None], tolerance_hint: str):
        self.api = api
        self.pull = pull
        self.report = report  # what the user should know now
        self.tolerance_hint = tolerance_hint
        self.present: set = set()
        self.pull_failures: set = set()  # images whose failed pull was reported
        self.ids: Dict[str, str] = {}  # reference -> the engine's image ID
        self._lock = threading.Lock()
        self._pulls: Dict[str, Future] = {}  # image -> its pull, until ensure saw it end

    def key(self, task: TaskSpec) -> str:
        """The task's adoption key (adoption.key_of), its image counted by the ID the engine
        has for it: a tag rebuilt between a run and its rerun is other work. An image the
        engine does not have counts by its reference (a dead run's task cannot have used it)."""
        return key_of(dataclasses.replace(task, image=self._image_id(task.image)), stat_identity)

    def _image_id(self, image: str) -> str:
        if image not in self.ids:
            try:
                self.ids[image] = self.api.inspect_image(image)["Id"]
            except docker.errors.DockerException:
                return image
        return self.ids[image]

    def ensure(self, image: str) -> None:
        """Return once the image is on the engine; raise NotYet while it is pulled, and
        what the pull met once it failed (the next call pulls again)."""
        with self._lock:
            if image in self.present:
                return
            pulling = self._pulls.get(image)
        if pulling is None:
            if self.pull != "always" and self._on_engine(image):
                with self._lock:
                    self.present.add(image)
                return
            with self._lock:
                if image not in self._pulls:
                    self._pulls[image] = in_background(self._pull, image, name="crank-pull")
            raise NotYet(f"pulling image {image!r}")
        if not pulling.done():
            raise NotYet(f"pulling image {image!r}")
        with self._lock:
            self._pulls.pop(image, None)
        pulling.result()  # what the pull raised
        with self._lock:
            self.present.add(image)
            self.ids.pop(image, None)  # the pull may have brought another image under the tag

    def _on_engine(self, image: str) -> bool:
        try:
            with engine_errors("looking up an image"):
                self.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            if self.pull == "never":
                raise ImageUnavailable(
                    f"image {image!r} is not on the Docker engine and pulling is off"
                ) from None
            return False
        except docker.errors.APIError as e:
            raise _invalid_image(image, e) from None

    def _pull(self, image: str) -> None:
        try:
            with engine_errors("pulling an image"):
                try:
                    self.api.pull(image)
                except docker.errors.APIError as e:
                    raise self._pull_failed(image, e) from None
        except docker.errors.DockerException as e:
            raise ImageUnavailable(f"could not pull image {image!r} ({short(e)})") from None

    def _pull_failed(self, image: str, error: docker.errors.APIError) -> CrankError:
        """What a refused pull means: a bad reference or an image the registry does not
        have for us fail the job now; anything else (most often a registry that cannot
        be reached) is said at once, once per image, and tried again."""
        if error.status_code == 400 or "invalid reference" in str(error):
            return _invalid_image(image, error)
        failed = f"could not pull image {image!r} ({short(error)})"
        if not error.is_server_error() or any(a in str(error).lower() for a in _REGISTRY_REFUSALS):
            return ImageUnavailable(failed)
        if image not in self.pull_failures:
            self.pull_failures.add(image)
            self.report(f"{failed}; trying again until {self.tolerance_hint} runs out")
        return BackendUnavailable(failed)


def _invalid_image(image: str, error: Exception) -> ImageUnavailable:
    e = ImageUnavailable(f"image reference {image!r} is invalid ({short(error)})")
    e.invalid_reference = True  # the fix is the reference, not loading an image
    return e
