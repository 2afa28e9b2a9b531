"""Constrained decoding: grammars compiled from a request's structured-output spec, one matcher
per request on the engine side, and a token bitmask per iteration that the sampler applies.

params.py     what a request asks for (vLLM's `StructuredOutputsParams` shape)
backend.py    the grammar-backend interface (a second backend plugs in here)
llguidance_backend.py  the backend in use (see docs/design.md, "Structured outputs")
manager.py    the engine's side: compile cache, per-request matchers, the batch's bitmask
bitmask.py    the bitmask as plain data (crosses to the worker) and its application to logits
"""
from orcinus.structured.params import GrammarError, StructuredOutputsParams

__all__ = ["GrammarError", "StructuredOutputsParams"]
