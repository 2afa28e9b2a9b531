"""The worker's side of the phase profile (`bench offline --profile`): one iteration's input
preparation, forward and sampling, timed on the forward thread only when the message asks
(`BatchMessage.timed`), reported as plain data in the reply (`SamplerOutput.phases`), so it works
the same in this process and across processes.

On CUDA the forward pass only enqueues kernels and returns; the host waits for them later, in the
sampler's copy of the tokens, so a wall clock would put the GPU's time in "sampling". There the
forward and sampling phases are also timed with CUDA events recorded on the forward thread's
current stream at each phase's start and end. They are read when the iteration ends: the sampler
has already copied the tokens to the host (waiting for the stream up to there), so waiting for the
last end marker adds no real synchronisation.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from orcinus.executor.messages import WorkerPhases

DEVICE_TIMED_PHASES = ("forward", "sampling")


class IterationTimer:
    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: dict[str, tuple] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        events = None
        if self.on_cuda and name in DEVICE_TIMED_PHASES:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if events is not None:
                events[1].record()
                self._events[name] = events

    def result(self) -> WorkerPhases:
        device: dict[str, float] = {}
        if self._events:
            last_end = list(self._events.values())[-1][1]
            last_end.synchronize()  # recorded after the phases that were recorded before it
            device = {p: start.elapsed_time(end) / 1e3 for p, (start, end) in self._events.items()}
        return WorkerPhases(dict(self.seconds), device)


def phase(timer: IterationTimer | None, name: str):
    """`timer.phase(name)`, or nothing when the message is not timed."""
    return timer.phase(name) if timer is not None else contextlib.nullcontext()
