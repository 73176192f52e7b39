"""Threads that follow the cores other processes leave free.

llama.cpp splits each decode over its threads and waits for the slowest at every barrier. A thread that shares
its core with another process's work (a browser, a build, a second model) is descheduled for whole time slices,
and every decode waits for it: with 2 threads on 2 cores and one busy-loop process, a decode took several times
its quiet time. One thread fewer then runs on the cores that are free, at the speed of those cores.

So the engine samples, every CHECK_SECONDS while it decodes, how much of the machine's CPU time other processes
took (the system's busy time, steal included, less this process's own) and decodes with the cores left over,
never more than it was given (--threads). A change needs two samples that agree (one busy moment is not a
busy machine), and the count comes back up as soon as the cores are free again.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import psutil

CHECK_SECONDS = 0.25  # how often the machine is sampled while decoding (/proc/stat and this process's times: ~50 us)
TAKEN = 0.65  # other processes' work beyond this share of a core takes a thread away (on 2 cores: work of
# 0.65 cores or less leaves both threads, a busy loop leaves one)


def following() -> bool:
    """Whether threads follow the free cores (TANDEM_FOLLOW_CORES=0 keeps --threads fixed: for comparisons)."""
    return os.environ.get("TANDEM_FOLLOW_CORES", "1") != "0"


def usable_cpus() -> list[int] | None:
    """The CPUs this process may run on (its affinity: a container's or taskset's share); None: all of them."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


@dataclass
class _Sample:
    at: float
    busy: float  # the machine's CPU seconds spent busy (steal included: a hypervisor's other guests)
    own: float  # this process's CPU seconds


BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _sample(cpus: list[int] | None) -> _Sample:
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = per_cpu if cpus is None else [per_cpu[i] for i in cpus if i < len(per_cpu)]
    busy = sum(getattr(times, name, 0.0) for times in chosen for name in BUSY_FIELDS)
    mine = psutil.Process().cpu_times()
    return _Sample(time.monotonic(), busy, mine.user + mine.system)


class FreeCores:
    """The thread count to decode with now: at most `wanted`, at most the cores other processes leave free."""

    def __init__(self, wanted: int):
        self.wanted = max(1, wanted)
        self._cpus = usable_cpus()
        self.cores = len(self._cpus) if self._cpus else os.cpu_count() or 1
        self.threads = self.wanted
        self.others = 0.0  # cores' worth of other processes' work in the last sample
        self._last = _sample(self._cpus)
        self._next = self._last.at + CHECK_SECONDS
        self._pending: int | None = None  # a count one sample has asked for; a second must agree

    def due(self, now: float) -> bool:
        return now >= self._next

    def check(self) -> int | None:
        """Sample the machine; the new thread count when it changes, else None."""
        return self.update(_sample(self._cpus))

    def update(self, sample: _Sample) -> int | None:
        last, self._last = self._last, sample
        self._next = sample.at + CHECK_SECONDS
        wall = sample.at - last.at
        if wall <= 0:
            return None
        own = sample.own - last.own
        self.others = max(0.0, (sample.busy - last.busy - own) / wall)
        fit = max(1, min(self.wanted, self.cores - math.ceil(self.others - TAKEN)))
        if fit == self.threads:
            self._pending = None
            return None
        if self._pending != fit:  # the first sample that asks: wait for a second
            self._pending = fit
            return None
        self._pending = None
        self.threads = fit
        return fit

    def describe(self) -> str:
        if self.threads == self.wanted:
            return f"{self.threads} threads"
        return f"{self.threads} of {self.wanted} threads (other processes keep {self.others:.1f} of {self.cores} cores busy)"
