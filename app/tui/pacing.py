"""How often the chat app repaints while a reply streams.

On this 2-core machine the engine runs llama.cpp on every core; each millisecond the UI thread
runs steals a core from a llama.cpp worker, and the other worker then waits at the next barrier,
so UI time costs the engine about twice its length (measured: 46 ms of UI work made 57 tokens
130 ms slower). The pacer measures what the UI thread really spent since its last update (layout,
painting, key handling) and spaces updates so that stays within a budget: a small one when the
engine has every core, a generous one when a core is spare.
"""

from __future__ import annotations

import os
import time

FASTEST, SLOWEST = 0.1, 1.0  # seconds between updates
BUDGET_SHARED = 0.05  # fraction of one core the UI may use while the engine needs them all (~4-5 repaints/s here)
BUDGET_SPARE = 0.5


def ui_budget(engine_threads: int, cores: int | None = None) -> float:
    cores = cores or os.cpu_count() or 1
    return BUDGET_SPARE if cores > engine_threads else BUDGET_SHARED


class RefreshPacer:
    def __init__(self, budget: float, clock=time.perf_counter, cpu_clock=time.thread_time):
        self.budget = budget
        self._clock, self._cpu_clock = clock, cpu_clock
        self.interval = FASTEST
        self.updates = 0
        self._due = 0.0
        self._cpu_mark = cpu_clock()

    def restart(self) -> None:
        """A new reply: update soon, measure from here."""
        self._due = 0.0
        self._cpu_mark = self._cpu_clock()

    def due(self) -> bool:
        return self._clock() >= self._due

    def updated(self) -> None:
        """Call after an update: the UI CPU since the last one sets the next interval."""
        self.updates += 1
        cpu = self._cpu_clock()
        spent, self._cpu_mark = cpu - self._cpu_mark, cpu
        self.interval = min(SLOWEST, max(FASTEST, spent / self.budget))
        self._due = self._clock() + self.interval
