"""How many CPU threads the forward pass uses, decided while the engine runs (`cpu_thread_policy=auto`).

Two measurements pull in opposite directions (docs/benchmarks.md, "Issue 21 in one quiet
sitting"): on a machine of its own, OpenMP workers that spin ~10,000 `pause`s between parallel
regions ran the 64-request trace 32 % faster than workers that sleep at once (157 against 119
tok/s on two cores); beside one busy process the same spinning cost 1.49x the CPU per output token,
and libgomp's default spinning 5.5x, because a spinning worker burns the time slices the working
thread needs. libgomp reads its waiting policy once, when torch loads it, so the policy cannot
follow the machine; the number of threads can. A single thread has no worker to spin.

So `auto` spins (GOMP_SPINCOUNT=10000) and this governor watches what *other* processes use of
the cores: the machine's busy CPU time (/proc/stat, steal included) minus this process's own
(getrusage), per second of wall time. When others take more than `shrink_above` of a core, the
forward pass drops to the threads that are left free (at least one); when they take less than
`grow_below`, it returns to all of them. The two thresholds and a dwell time after every change
keep it from flapping. Only the forward thread calls it (torch's thread count is per calling
thread for OpenMP), between iterations, at most once per `window_s`.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("orcinus")


@dataclass(frozen=True)
class GovernorSettings:
    window_s: float = 0.25  # the shortest span a decision looks at
    shrink_above: float = 0.35  # cores used by others that make the team smaller
    grow_below: float = 0.15  # cores used by others under which it grows back
    dwell_s: float = 1.0  # no other change this soon after one


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq, steal);
    None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def target_threads(current: int, most: int, cores: int, others: float, settings: GovernorSettings) -> int:
    """The team size for the next window, given the cores other processes used in the last one."""
    free = cores - others
    if others > settings.shrink_above:
        fit = max(1, math.floor(free + settings.shrink_above))
        if fit < current:
            return fit
    if current < most and others < settings.grow_below:
        return max(current, min(most, math.floor(free + settings.grow_below)))
    return current


class ThreadGovernor:
    """Call `tick()` on the forward thread before each iteration."""

    def __init__(self, most: int, cores: int, set_threads: Callable[[int], None],
                 settings: GovernorSettings = GovernorSettings(),
                 machine: Callable[[], float | None] = machine_cpu_seconds,
                 own: Callable[[], float] = own_cpu_seconds,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.most, self.cores, self.threads = most, cores, most
        self.settings = settings
        self._set, self._machine, self._own, self._clock = set_threads, machine, own, clock
        self._last: tuple[float, float, float] | None = None  # wall, machine busy, own
        self._changed_at = -math.inf
        self.changes: list[tuple[float, int, float]] = []  # (wall, threads, others' cores): for logs and tests

    def tick(self) -> int:
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.settings.window_s:
            return self.threads
        busy = self._machine()
        if busy is None:
            return self.threads
        own = self._own()
        last, self._last = self._last, (now, busy, own)
        if last is None or now - self._changed_at < self.settings.dwell_s:
            return self.threads
        wall = now - last[0]
        others = max(0.0, ((busy - last[1]) - (own - last[2])) / wall)
        want = target_threads(self.threads, self.most, self.cores, others, self.settings)
        if want != self.threads:
            self._set(want)
            log.info("orcinus: %d CPU thread(s) for the forward pass (other processes used %.2f of %d cores)",
                     want, others, self.cores)
            self.threads, self._changed_at = want, now
            self.changes.append((now, want, others))
        return self.threads


def governor_for(device_type: str, policy: str) -> ThreadGovernor | None:
    """A governor for this process's forward thread when `cpu_thread_policy` is auto (and orcinus set
    the OpenMP variables), on CPU, with orcinus choosing the thread count (no OMP_NUM_THREADS) and
    at least two threads; else None."""
    import torch

    from orcinus import thread_policy
    from orcinus.cpu_features import cpu_threads

    if device_type != "cpu" or not thread_policy.governed(policy):
        return None
    if "OMP_NUM_THREADS" in os.environ or machine_cpu_seconds() is None:
        return None
    most = torch.get_num_threads()
    if most < 2:
        return None
    return ThreadGovernor(most, cpu_threads(), torch.set_num_threads)
