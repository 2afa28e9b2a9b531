"""orcinus: an LLM serving system with Orca's iteration-level scheduling and selective batching."""
from orcinus import thread_policy as _thread_policy

# Before anything imports torch: libgomp reads its wait policy once, when torch loads it
# (orcinus/thread_policy.py). A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT is left alone.
try:
    _thread_policy.apply()
except _thread_policy.ThreadPolicyError as _exc:  # a bad ORCINUS_CPU_THREAD_POLICY must not break the import
    import warnings

    warnings.warn(f"{_exc}; using auto", stacklevel=2)
    _thread_policy.apply("auto")

from orcinus.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import orcinus` stays cheap; torch and the model code load on first use.
    if name == "LLM":
        from orcinus.engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from orcinus.engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
