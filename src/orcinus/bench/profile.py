"""Per-iteration time breakdown of an in-process engine run (`orcinus bench offline --profile`).

The phases are timed by wrapping the methods that implement them, for the duration of the run
only, so the engine carries no profiling code: scheduling (the scheduler and the batch message),
input preparation (the model runner's flat tensors and attention metadata), forward (the model to
the sampled rows' logits), sampling, and output processing (appending tokens, detokenisation, stop
checks). Whatever else `LLMEngine.step` spends (worker-side request state, bookkeeping) is "other".
Wall-clock time, single-process executor only (a multi-process run times the driver side).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

PHASES: dict[str, list[tuple[str, str, str]]] = {
    "scheduling": [("orcinus.core.scheduler", "Scheduler", "schedule"),
                   ("orcinus.core.scheduler", "StaticScheduler", "schedule"),
                   ("orcinus.core.scheduler", "Scheduler", "finish_batch"),
                   ("orcinus.engine.batch_messages", "MessageBuilder", "build")],
    "input preparation": [("orcinus.executor.model_runner", "ModelRunner", "prepare")],
    "forward": [("orcinus.executor.model_runner", "ModelRunner", "forward_logits")],
    "sampling": [("orcinus.sampler", "Sampler", "__call__")],
    "output processing (detokenisation)": [("orcinus.engine.output_processor", "OutputProcessor", "append_token"),
                                           ("orcinus.engine.output_processor", "OutputProcessor", "collect"),
                                           ("orcinus.engine.output_processor", "OutputProcessor", "on_finished")],
}
TOTAL = ("orcinus.engine.llm_engine", "LLMEngine", "step")


@dataclass
class PhaseProfile:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    iterations: int = 0
    total_s: float = 0.0

    def rows(self) -> list[list]:
        """[phase, seconds, ms per iteration, % of step time]; 'other' is the unaccounted rest."""
        out = []
        its = max(self.iterations, 1)
        for phase, s in list(self.seconds.items()) + [("other", self.total_s - sum(self.seconds.values()))]:
            out.append([phase, s, 1e3 * s / its, 100.0 * s / self.total_s if self.total_s else float("nan")])
        return out

    def to_markdown(self) -> str:
        from orcinus.bench.report import markdown_table
        table = markdown_table(["phase", "s", "ms / iteration", "% of step"], self.rows())
        return f"{table}\n\n{self.iterations} forward iterations, {self.total_s:.3f} s in LLMEngine.step"


def _timed(fn, profile: PhaseProfile, phase: str, depth: list[int]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Nested wrapped calls (a subclass calling super) count once, in the outermost phase.
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.seconds[phase] += time.perf_counter() - t0
            profile.calls[phase] += 1
            depth[0] -= 1
    return wrapper


@contextlib.contextmanager
def profile_phases():
    """Yields a PhaseProfile filled while the block runs; the methods are restored afterwards."""
    import importlib

    profile = PhaseProfile()
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
                patch(module, cls_name, attr, lambda fn, p=phase, d=depth: _timed(fn, profile, p, d))
        profile.seconds["_step"], profile.calls["_step"] = 0.0, 0
        patch(*TOTAL, lambda fn: _timed(fn, profile, "_step", [0]))
        yield profile
    finally:
        for cls, attr, original in reversed(saved):
            setattr(cls, attr, original)
        profile.total_s = profile.seconds.pop("_step", 0.0)
        profile.calls.pop("_step", None)
        profile.iterations = profile.calls.get("forward", 0)
