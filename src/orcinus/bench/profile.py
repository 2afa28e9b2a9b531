"""Per-iteration time breakdown of an in-process engine run (`orcinus bench offline --profile`).

The phases are timed by wrapping the methods that implement them, for the duration of the run
only, so the engine carries no profiling code. Wall-clock time, single-process executor only (a
multi-process run times the driver side).

Two threads do the work. The engine thread (inside `LLMEngine.step`): scheduling (the scheduler
and the batch message), output tokens (appending tokens and the stops that need no text, before
the next launch), output processing (detokenisation, log-prob text, stop strings, outputs, while
the next iteration runs), and waiting for the iteration; the unaccounted rest is "other". The
forward thread (`SingleProcessExecutor`'s): input preparation (the model runner's flat tensors and
attention metadata), forward (the model to the sampled rows' logits) and sampling. Their share is
also given against the step time, but they overlap the engine thread's phases (and the caller's
time between steps), so they are not part of its sum.

On CUDA the forward pass only enqueues kernels and returns; the host waits for them later, in the
sampler's copy of the tokens, so a wall clock would put the GPU's time in "sampling". There the
forward and sampling phases are timed with CUDA events recorded on the forward thread's stream at
each call's start and end (GPU time between the two markers, read once after the run, so the
profile adds no synchronisation to the iterations); their host wall time is kept beside it
(`host_seconds`).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

ENGINE_THREAD_PHASES: dict[str, list[tuple[str, str, str]]] = {
    "scheduling": [("orcinus.core.scheduler", "Scheduler", "schedule"),
                   ("orcinus.core.scheduler", "StaticScheduler", "schedule"),
                   ("orcinus.core.scheduler", "Scheduler", "finish_batch"),
                   ("orcinus.engine.batch_messages", "MessageBuilder", "build")],
    "output tokens and stops": [("orcinus.engine.output_processor", "OutputProcessor", "append_token")],
    "output processing (detokenisation)": [("orcinus.engine.output_processor", "OutputProcessor", "process_text"),
                                           ("orcinus.engine.output_processor", "OutputProcessor", "collect")],
    "waiting for the iteration": [("orcinus.engine.llm_engine", "LLMEngine", "_wait_for")],
}
FORWARD_THREAD_PHASES: dict[str, list[tuple[str, str, str]]] = {
    "input preparation": [("orcinus.executor.model_runner", "ModelRunner", "prepare")],
    "forward": [("orcinus.executor.model_runner", "ModelRunner", "forward_logits")],
    "sampling": [("orcinus.executor.sampler", "Sampler", "__call__")],
}
PHASES = FORWARD_THREAD_PHASES | ENGINE_THREAD_PHASES
# On CUDA these phases are timed by CUDA events (GPU time), not by the host's clock.
DEVICE_TIMED_PHASES = ("forward", "sampling")
TOTAL = ("orcinus.engine.llm_engine", "LLMEngine", "step")


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


def _timed(fn, profile: PhaseProfile, phase: str, depth: list[int], events: list | None = None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Nested wrapped calls (a subclass calling super) count once, in the outermost phase.
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        if events is not None:  # CUDA: markers on this thread's stream, read after the run
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if events is not None:
                end.record()
                events.append((start, end))
            profile.seconds[phase] += time.perf_counter() - t0
            profile.calls[phase] += 1
            depth[0] -= 1
    return wrapper


@contextlib.contextmanager
def profile_phases(device=None):
    """Yields a PhaseProfile filled while the block runs; the methods are restored afterwards.
    `device`: the engine's (a torch.device or None); on CUDA the DEVICE_TIMED_PHASES are timed
    with CUDA events."""
    import importlib

    profile = PhaseProfile()
    on_cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
    events: dict[str, list] = {p: [] for p in DEVICE_TIMED_PHASES} if on_cuda else {}
    saved: list[tuple[type, str, object]] = []

    def patch(module: str, cls_name: str, attr: str, wrap) -> None:
        cls = getattr(importlib.import_module(module), cls_name)
        saved.append((cls, attr, cls.__dict__[attr]))
        setattr(cls, attr, wrap(getattr(cls, attr)))

    try:
        for phase, targets in PHASES.items():
            profile.seconds[phase], profile.calls[phase] = 0.0, 0
            depth = [0]
            for module, cls_name, attr in targets:
                patch(module, cls_name, attr,
                      lambda fn, p=phase, d=depth: _timed(fn, profile, p, d, events.get(p)))
        profile.seconds["_step"], profile.calls["_step"] = 0.0, 0
        patch(*TOTAL, lambda fn: _timed(fn, profile, "_step", [0]))
        yield profile
    finally:
        for cls, attr, original in reversed(saved):
            setattr(cls, attr, original)
        profile.total_s = profile.seconds.pop("_step", 0.0)
        profile.calls.pop("_step", None)
        profile.iterations = profile.calls.get("forward", 0)
        if events:
            import torch

            torch.cuda.synchronize(device)
            for phase, pairs in events.items():
                profile.host_seconds[phase] = profile.seconds[phase]
                profile.seconds[phase] = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
                profile.device_timed.append(phase)
