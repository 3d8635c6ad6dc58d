"""A container's stdout and stderr followed while it runs, into the task's live logs
(live.py): a daemon thread per stream reads Docker's log stream, which ends when the
container stops. When both streams ended whole, the live logs are the task's logs;
otherwise the logs are read again from the engine at the end and continue them."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, List, Tuple

from ...task import TaskSpec
from .. import logs
from ..live import LiveLog, finish

SUFFIXES = (".stdout", ".stderr")


class Follower:
    def __init__(self, api, handle: str, task: TaskSpec):
        self.task = task
        self.live: Dict[str, LiveLog] = {s: LiveLog(task, s) for s in SUFFIXES}
        self.streams: List = []
        self.failed = False
        self._threads = [threading.Thread(target=self._follow, args=(api, handle, s), daemon=True,
                                          name=f"crank-follow-{handle[:12]}{s}") for s in SUFFIXES]
        for thread in self._threads:
            thread.start()

    def _follow(self, api, handle: str, suffix: str) -> None:
        try:
            stream = api.logs(handle, stdout=suffix == ".stdout", stderr=suffix == ".stderr",
                              stream=True, follow=True)
            self.streams.append(stream)
            for chunk in stream:
                self.live[suffix].append(chunk)
        except Exception:  # noqa: BLE001 - the logs are read again at the end
            self.failed = True

    def whole(self, timeout: float) -> bool:
        """Whether both streams ended by themselves (within ``timeout`` from now) and every
        byte reached its live log."""
        for thread in self._threads:
            thread.join(timeout)
        return not self.failed and not any(t.is_alive() for t in self._threads) and not any(
            log.failed for log in self.live.values())

    def saved(self) -> Tuple[Tuple[str, ...], str]:
        """The files and the stderr tail of logs that came whole."""
        files, tail = [], ""
        for suffix, log in self.live.items():
            finish(log)
            if log.failed:
                continue
            path = os.path.join(self.task.log_dir, log.name)
            files.append(path)
            if suffix == ".stderr":
                with contextlib.suppress(OSError):
                    fd = logs.open_job_file(path)
                    try:
                        tail = logs.read_tail(fd)
                    finally:
                        os.close(fd)
        return tuple(files), tail

    def stop(self) -> None:
        for stream in list(self.streams):
            with contextlib.suppress(Exception):
                stream.close()
        for thread in self._threads:
            thread.join(1.0)
