"""The virtual clock and the pipeline timeline of a simulated run.

Time moves only when the engine waits for an iteration (its future's `result()`) or pays its own
per-iteration overhead, and when the replay jumps to the next arrival; nothing reads the wall
clock, so a run is a pure function of its inputs."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def advance_to(self, t: float) -> None:
        if t > self.now:
            self.now = t


class PipelineTimeline:
    """When each stage is next free. A batch enters stage 0 at its launch, each stage starts it
    once the previous stage has sent it and the stage has finished the batch before (Orca's
    pipeline: up to `n_workers` batches in flight, one per stage)."""

    def __init__(self, num_stages: int) -> None:
        self.free_at = [0.0] * num_stages

    def run(self, launch: float, stages: list[tuple[float, float]]) -> float:
        """stages: (compute seconds, send seconds) per stage; returns when the last stage is done."""
        t = launch
        for s, (compute, send) in enumerate(stages):
            start = max(t, self.free_at[s])
            end = start + compute
            self.free_at[s] = end
            t = end + send
        return t


class VirtualFuture(Future, Generic[T]):
    """Resolved at creation; waiting on it moves the clock to when the iteration finished."""

    def __init__(self, clock: VirtualClock, done_at: float, value: T) -> None:
        super().__init__()
        self._clock, self.done_at = clock, done_at
        self.set_result(value)

    def result(self, timeout: float | None = None) -> T:
        self._clock.advance_to(self.done_at)
        return super().result(timeout)
