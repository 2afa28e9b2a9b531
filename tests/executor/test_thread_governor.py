"""The thread governor of `cpu_thread_policy=auto`: the forward pass's team follows the cores other
processes leave free. Decisions are driven here by scripted readings (machine and own CPU
seconds on a fake clock), so nothing depends on this machine's speed or load."""
from __future__ import annotations

import pytest

from orcinus.executor import thread_governor as tg
from orcinus.executor.thread_governor import GovernorSettings, ThreadGovernor, target_threads

S = GovernorSettings(window_s=0.25, shrink_above=0.35, grow_below=0.15, dwell_s=1.0)


@pytest.mark.parametrize("current, others, want", [
    (2, 0.0, 2), (2, 0.30, 2), (2, 0.40, 1), (2, 1.9, 1),  # shrink only past 0.35 of a core
    (1, 0.20, 1), (1, 0.10, 2), (1, 0.0, 2),  # grow back only under 0.15 (hysteresis)
])
def test_target_threads_on_two_cores(current: int, others: float, want: int) -> None:
    assert target_threads(current, 2, 2, others, S) == want


def test_target_threads_on_eight_cores_steps_to_what_is_free() -> None:
    assert target_threads(8, 8, 8, 3.0, S) == 5  # 5 cores free
    assert target_threads(8, 8, 8, 9.0, S) == 1  # never fewer than one
    assert target_threads(5, 8, 8, 0.05, S) == 8  # all free again: back to all
    assert target_threads(5, 8, 8, 2.0, S) == 5  # others still busy: neither shrink (5 + 2 < 8) nor grow


class Machine:
    """A scripted machine: per tick, the cores others use and this process uses."""

    def __init__(self) -> None:
        self.t = 0.0
        self.busy = 0.0
        self.own = 0.0

    def advance(self, seconds: float, others: float, own: float) -> None:
        self.t += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds


def _governor(m: Machine, calls: list[int]) -> ThreadGovernor:
    return ThreadGovernor(2, 2, calls.append, S, machine=lambda: m.busy, own=lambda: m.own, clock=lambda: m.t)


def test_governor_shrinks_beside_a_neighbour_and_grows_back_when_it_leaves() -> None:
    m, calls = Machine(), []
    gov = _governor(m, calls)
    for _ in range(20):  # quiet: two threads of ours, nobody else
        gov.tick()
        m.advance(0.1, others=0.0, own=2.0)
    assert gov.threads == 2 and calls == []
    for _ in range(5):  # a busy loop starts: one core's worth of others
        gov.tick()
        m.advance(0.1, others=1.0, own=1.0)
    assert gov.threads == 1 and calls == [1]
    for _ in range(30):  # it stays: no flapping while it runs
        gov.tick()
        m.advance(0.1, others=1.0, own=1.0)
    assert calls == [1]
    for _ in range(30):  # it leaves
        gov.tick()
        m.advance(0.1, others=0.0, own=1.0)
    assert gov.threads == 2 and calls == [1, 2]
    assert [c[1] for c in gov.changes] == [1, 2]


def test_governor_waits_a_dwell_time_after_a_change() -> None:
    m, calls = Machine(), []
    gov = _governor(m, calls)
    gov.tick()
    m.advance(0.3, others=1.0, own=1.0)
    gov.tick()
    assert calls == [1]
    m.advance(0.3, others=0.0, own=1.0)  # quiet again at once: too soon to change back
    gov.tick()
    assert calls == [1]
    for _ in range(10):
        m.advance(0.3, others=0.0, own=1.0)
        gov.tick()
    assert calls == [1, 2]


def test_governor_reads_at_most_once_per_window() -> None:
    m, reads = Machine(), []

    def machine() -> float:
        reads.append(m.t)
        return m.busy

    gov = ThreadGovernor(2, 2, lambda n: None, S, machine=machine, own=lambda: m.own, clock=lambda: m.t)
    for _ in range(100):  # 100 iterations in 1 s
        gov.tick()
        m.advance(0.01, others=0.0, own=2.0)
    assert 3 <= len(reads) <= 5


def test_governor_only_for_auto_on_cpu_without_omp_num_threads(monkeypatch) -> None:
    from orcinus import thread_policy

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(thread_policy, "governed", lambda policy: policy == "auto")
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    assert tg.governor_for("cpu", "auto") is not None
    assert tg.governor_for("cuda", "auto") is None
    assert tg.governor_for("cpu", "passive") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert tg.governor_for("cpu", "auto") is None


def test_machine_cpu_seconds_reads_proc_stat() -> None:
    first = tg.machine_cpu_seconds()
    if first is None:
        pytest.skip("no /proc/stat on this system")
    x = 0
    for i in range(2_000_000):  # some CPU work of our own
        x += i
    assert tg.machine_cpu_seconds() >= first
