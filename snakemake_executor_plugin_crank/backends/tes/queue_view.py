"""What waits and what runs on the TES server, as one line when it changes (what ``squeue``
told a Slurm user): ``40 queued, 12 initializing, 96 running on <server>``, at most every
INTERVAL_S, silent while nothing changes and while nothing of the run waits or runs."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable, Optional, Tuple

INTERVAL_S = 30.0
# (TES state, as the line says it), in the order a task goes through them
SHOWN = (("QUEUED", "queued"), ("INITIALIZING", "initializing"), ("RUNNING", "running"),
         ("PAUSED", "paused"))


class QueueView:
    def __init__(self, server: str, report: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, interval_s: float = INTERVAL_S):
        self.server = server
        self.report = report
        self.clock = clock
        self.interval_s = interval_s
        self._said: Optional[Tuple[int, ...]] = None
        self._said_at: Optional[float] = None

    def update(self, states: Iterable[str]) -> None:
        """The TES states of the run's tasks now (those that ended too: not counted)."""
        counts = Counter(states)
        shown = tuple(counts.get(state, 0) for state, _ in SHOWN)
        if shown == self._said or not any(shown):
            return
        now = self.clock()
        if self._said_at is not None and now - self._said_at < self.interval_s:
            return  # said at the next round after the interval, if it still differs
        self._said, self._said_at = shown, now
        parts = [f"{n} {name}" for n, (_, name) in zip(shown, SHOWN) if n]
        self.report(f"{', '.join(parts)} on {self.server}")
