"""Progress beats: when each rank last finished a piece of work, so that liveness follows real
progress rather than emitted tokens.

An iteration may emit nothing for minutes (the chunks of a long prefill) while every layer of
every chunk completes; a worker stopped by SIGSTOP, or stuck in a collective with one that is,
completes nothing. Each rank writes time.monotonic() (one clock for every process of a machine)
into its slot of a shared array whenever a decoder layer finishes; the executor reads the newest
slot. Only plain doubles cross the process boundary.
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Callable

import torch


class Progress:
    """One slot per rank, in shared memory (passed to spawned workers as a process argument)."""

    def __init__(self, slots: int, ctx=None) -> None:
        self._slots = (ctx or multiprocessing).RawArray("d", max(slots, 1))
        now = time.monotonic()
        for i in range(len(self._slots)):
            self._slots[i] = now

    def beat(self, slot: int = 0) -> None:
        self._slots[slot] = time.monotonic()

    def beater(self, slot: int = 0) -> Callable[[], None]:
        return lambda: self.beat(slot)

    def latest(self) -> float:
        """When any rank last made progress (time.monotonic())."""
        return max(self._slots)


def watch_layers(model: torch.nn.Module, beat: Callable[[], None]) -> int:
    """Call beat() after every layer of the model's layer lists (a forward hook each; on CUDA a
    replayed graph runs no hooks, nor does a fused CPU decode step, which beats once; each of their
    iterations is short). Returns the hooks set."""
    def hook(*_) -> None:
        beat()

    # Marked so that a path running the layers without calling them (layers/fused_decode.py, one C
    # call per decode step) can tell this hook from others and beat once for the whole step.
    hook.progress_beat = True  # type: ignore[attr-defined]
    hooks = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                layer.register_forward_hook(hook)
                hooks += 1
    return hooks
