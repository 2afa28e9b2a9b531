"""Per-iteration time breakdown of an engine run (`orcinus bench offline --profile`).

An outside consumer of the engine: `profile_phases(engine)` registers an observer that asks for
phase timings (`LLMEngine.add_observer(fn, phases=True)`, engine/iteration_stats.py) and sums
what each step reports; nothing is patched. Wall-clock time.

Two threads do the work. The engine thread (inside `LLMEngine.step`, timed by the engine):
scheduling (the scheduler and the batch message), output tokens (appending tokens and the stops
that need no text, before the next launch), output processing (detokenisation, log-prob text,
stop strings, outputs, while the next iteration runs), and waiting for the iteration; the
unaccounted rest is "other". The forward thread (the worker that samples, in this process or
another, timed there and reported in its reply): input preparation (the model runner's flat
tensors and attention metadata), forward (the model to the sampled rows' logits) and sampling.
Their share is also given against the step time, but they overlap the engine thread's phases (and
the caller's time between steps), so they are not part of its sum.

On CUDA the forward pass only enqueues kernels and returns; the host waits for them later, in the
sampler's copy of the tokens, so a wall clock would put the GPU's time in "sampling". There the
worker also times forward and sampling with CUDA events on the forward thread's stream
(executor/phase_timing.py); the profile reports that GPU time, and keeps their host wall time
beside it (`host_seconds`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from orcinus.engine.iteration_stats import IterationStats
from orcinus.executor.phase_timing import DEVICE_TIMED_PHASES

FORWARD_THREAD_PHASES = ("input preparation", "forward", "sampling")
ENGINE_THREAD_PHASES = ("scheduling", "output tokens and stops", "output processing (detokenisation)",
                        "waiting for the iteration")
PHASES = FORWARD_THREAD_PHASES + ENGINE_THREAD_PHASES


@dataclass
class PhaseProfile:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    iterations: int = 0
    total_s: float = 0.0
    device_timed: list[str] = field(default_factory=list)  # phases whose seconds are CUDA event time
    host_seconds: dict[str, float] = field(default_factory=dict)  # their host wall time

    def engine_thread_s(self) -> float:
        return sum(s for p, s in self.seconds.items() if p in ENGINE_THREAD_PHASES)

    def rows(self) -> list[list]:
        """[phase, seconds, ms per iteration, % of step time]: the forward thread's phases, then the
        engine thread's, then 'other', the engine thread's unaccounted rest."""
        out = []
        its = max(self.iterations, 1)
        for phase, s in list(self.seconds.items()) + [("other", self.total_s - self.engine_thread_s())]:
            label = f"{phase} (forward thread)" if phase in FORWARD_THREAD_PHASES else phase
            if phase in self.device_timed:
                label += ", GPU time"
            out.append([label, s, 1e3 * s / its, 100.0 * s / self.total_s if self.total_s else float("nan")])
        return out

    def to_markdown(self) -> str:
        from orcinus.bench.report import markdown_table
        table = markdown_table(["phase", "s", "ms / iteration", "% of step"], self.rows())
        text = (f"{table}\n\n{self.iterations} forward iterations, {self.total_s:.3f} s in LLMEngine.step; the "
                "forward thread's phases overlap the engine thread's and are not part of the step's sum")
        if self.device_timed:
            host = ", ".join(f"{p} {self.host_seconds[p]:.3f} s" for p in self.device_timed)
            text += f"; {', '.join(self.device_timed)}: GPU time from CUDA events (host wall time: {host})"
        return text


@contextlib.contextmanager
def profile_phases(engine) -> Iterator[PhaseProfile]:
    """Yields a PhaseProfile filled by `engine`'s steps while the block runs (an `LLMEngine`;
    observed, not patched). Where the workers timed forward and sampling with CUDA events, those
    phases' seconds are GPU time."""
    profile = PhaseProfile(seconds={p: 0.0 for p in PHASES}, calls={p: 0 for p in PHASES})
    device: dict[str, float] = {}

    def observe(it: IterationStats) -> None:
        if it.phases is None:
            return
        profile.total_s += it.phases.step_s
        for phase, s in it.phases.seconds.items():
            profile.seconds[phase] = profile.seconds.get(phase, 0.0) + s
            profile.calls[phase] = profile.calls.get(phase, 0) + it.phases.calls.get(phase, 0)
        for worker in it.phases.worker:
            for phase, s in worker.seconds.items():
                profile.seconds[phase] = profile.seconds.get(phase, 0.0) + s
                profile.calls[phase] = profile.calls.get(phase, 0) + 1
            for phase, s in worker.device_seconds.items():
                device[phase] = device.get(phase, 0.0) + s

    engine.add_observer(observe, phases=True)
    try:
        yield profile
    finally:
        engine.remove_observer(observe)
        profile.iterations = profile.calls.get("forward", 0)
        for phase in DEVICE_TIMED_PHASES:
            if phase in device:
                profile.host_seconds[phase] = profile.seconds[phase]
                profile.seconds[phase] = device[phase]
                profile.device_timed.append(phase)
