"""orcinus: an LLM serving system with Orca's iteration-level scheduling and selective batching."""
from orcinus.sampling_params import SamplingParams

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
