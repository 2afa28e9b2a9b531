"""Per-iteration KV memory samples of an engine run, their summary, and the utilisation plot.

After every `step()` the recorder reads the engine's stats (it observes the engine's iterations,
`LLMEngine.add_observer`; it patches nothing): how many sequences hold KV space,
how many KV slots requests hold (Orca: reserved worst cases; paged: blocks as they fill) and how
many of those hold a computed token. Utilisation is real / allocated, the vLLM paper's measure
of how much of the memory given to requests does useful work.

It also counts the tokens the model really computed, from each scheduled batch: prompt tokens
(fewer than the trace's when a cached prefix is reused) and all tokens (more than prompt + output
when preempted requests are recomputed).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from orcinus.engine.iteration_stats import IterationStats


@dataclass
class KVSample:
    t: float  # seconds since the recorder started
    running: int  # sequences holding KV space
    real_slots: int
    allocated_slots: int
    tokens: int = 0  # tokens computed by the batches scheduled since the previous sample
    # the largest of those batches: one step may schedule two (the engine launches the next
    # iteration before it returns), so a per-iteration budget shows here, not in `tokens`
    max_batch_tokens: int = 0

    @property
    def utilisation(self) -> float:
        return self.real_slots / self.allocated_slots if self.allocated_slots else math.nan


@dataclass
class KVUsageSummary:
    iterations: int
    mean_running: float
    mean_utilisation: float  # mean over iterations where some slot was allocated
    mean_allocated_fraction: float  # allocated slots / pool, mean over iterations
    preemptions: int
    prefix_cache_hit_rate: float
    prefix_cache_hits: int = 0  # prompt tokens whose KV was found cached
    prompt_tokens_computed: int = 0  # prompt positions run through the model (cache hits skip theirs)
    tokens_computed: int = 0  # every position run through the model (prompts, decodes, recomputation)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class KVRecorder:
    """Observes `engine` (`LLMEngine.add_observer`): every step leaves a sample; `detach()` stops."""

    engine: object
    samples: list[KVSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._t0 = time.perf_counter()
        self.prompt_tokens_computed = 0
        self.tokens_computed = 0
        # counter values the summary subtracts: none before restart(), the engine's since start
        self._preempt0 = self._q0 = self._h0 = 0
        self.engine.add_observer(self._observe)

    def _observe(self, it: IterationStats) -> None:
        tokens = sum(b.num_tokens for b in it.launched)
        self.prompt_tokens_computed += sum(b.num_prompt_tokens for b in it.launched)
        self.tokens_computed += tokens
        s = it.stats
        self.samples.append(KVSample(time.perf_counter() - self._t0, s.num_running, s.kv_real_token_slots,
                                     s.kv_allocated_slots, tokens, max((b.num_tokens for b in it.launched), default=0)))

    def restart(self) -> None:
        """Forget samples so far (e.g. those of a warm-up) and restart the clock."""
        self.samples.clear()
        self.prompt_tokens_computed = self.tokens_computed = 0
        self._t0 = time.perf_counter()
        s = self.engine.stats()
        self._preempt0, self._q0, self._h0 = (s.num_preemptions_total, s.prefix_cache_queries_total,
                                              s.prefix_cache_hits_total)

    def detach(self) -> None:
        self.engine.remove_observer(self._observe)

    def summary(self) -> KVUsageSummary:
        s = self.engine.stats()
        base = self._preempt0, self._q0, self._h0
        pool = self.engine.kv_cache.n_slots
        queries = s.prefix_cache_queries_total - base[1]
        mean_running, mean_utilisation = sample_means(self.samples)
        return KVUsageSummary(
            iterations=len(self.samples),
            mean_running=mean_running,
            mean_utilisation=mean_utilisation,
            mean_allocated_fraction=(sum(x.allocated_slots for x in self.samples) / len(self.samples) / pool
                                     if self.samples else math.nan),
            preemptions=s.num_preemptions_total - base[0],
            prefix_cache_hit_rate=(s.prefix_cache_hits_total - base[2]) / queries if queries else 0.0,
            prefix_cache_hits=s.prefix_cache_hits_total - base[2],
            prompt_tokens_computed=self.prompt_tokens_computed,
            tokens_computed=self.tokens_computed,
        )


def sample_means(samples: Sequence[KVSample]) -> tuple[float, float]:
    """Mean running sequences, and mean utilisation over the samples where some slot was
    allocated (NaN when there are none)."""
    util = [x.utilisation for x in samples if x.allocated_slots]
    return (sum(x.running for x in samples) / len(samples) if samples else math.nan,
            sum(util) / len(util) if util else math.nan)


def plot_kv_utilisation(series: dict[str, list[KVSample]], path: str, title: str = "") -> None:
    """KV utilisation (real tokens / allocated slots) and allocated fraction over time, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for name, samples in series.items():
        pts = [(s.t, 100.0 * s.utilisation) for s in samples if s.allocated_slots]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
    ax.set_xlabel("time since the trace started (s)")
    ax.set_ylabel("KV utilisation: real tokens / allocated slots (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    if ax.lines:  # a run too short for any sample with KV allocated draws nothing
        ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
