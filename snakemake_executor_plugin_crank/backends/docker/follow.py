"""A container's stdout and stderr followed while it runs, into the task's live logs
(live.py): a daemon thread per stream reads Docker's log stream. The streams may end
before Docker has written a last line without a newline, so the end reads the logs again
(logs.save_logs), which continue the live logs."""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, List

from ...task import TaskSpec
from ..live import LiveLog, live_logs

class Follower:
    def __init__(self, api, handle: str, task: TaskSpec):
        self.live: Dict[str, LiveLog] = live_logs(task)
        self.streams: List = []
        self._threads = [threading.Thread(target=self._follow, args=(api, handle, s), daemon=True,
                                          name=f"crank-follow-{handle[:12]}{s}") for s in self.live]
        for thread in self._threads:
            thread.start()

    def _follow(self, api, handle: str, suffix: str) -> None:
        with contextlib.suppress(Exception):  # the logs are read again at the end
            stream = api.logs(handle, stdout=suffix == ".stdout", stderr=suffix == ".stderr",
                              stream=True, follow=True)
            self.streams.append(stream)
            for chunk in stream:
                self.live[suffix].append(chunk)

    def stop(self) -> None:
        """No more appending: the streams closed, the live logs handed over."""
        for log in self.live.values():
            log.end_appending()
        for stream in list(self.streams):
            with contextlib.suppress(Exception):
                stream.close()
