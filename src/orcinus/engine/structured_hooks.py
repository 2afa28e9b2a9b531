"""The few places the engine touches structured outputs, kept here so the engine loop only
calls them: matchers for a new request, the bitmask of a launched batch, a token accepted."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orcinus.request import FinishReason, Request, RequestRejected

if TYPE_CHECKING:
    from orcinus.core.scheduler import ScheduledBatch
    from orcinus.executor.messages import BatchMessage
    from orcinus.sampling_params import SamplingParams
    from orcinus.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


def check_logit_bias(params: "SamplingParams", vocab_size: int) -> None:
    bad = [t for t in (params.logit_bias or {}) if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                              "logit_bias")


def make_matchers(manager: "StructuredOutputManager", params: "SamplingParams", children: list[Request]) -> None:
    """One matcher per sample (n > 1 samples follow the grammar independently). Raises
    GrammarError (a ValueError naming the problem) when the spec does not compile."""
    spec = params.structured_outputs
    if spec is None:
        return
    compiled = manager.compile(spec)
    for child in children:
        child.matcher = compiled.new_matcher()


def attach_bitmask(manager: "StructuredOutputManager", msg: "BatchMessage", batch: "ScheduledBatch") -> None:
    """Allowed tokens for the constrained requests that sample in this batch. Each has appended
    every token it was given (a running request is never scheduled twice), so its matcher is
    exactly at the end of its output."""
    sampled = set(msg.sampled_ids)
    rows = [(r.request_id, r.matcher) for r in batch.requests
            if r.matcher is not None and r.request_id in sampled]
    if rows:
        msg.token_bitmask = manager.bitmask(rows)


def accept_token(req: Request, token: int) -> None:
    """Advance the request's matcher by its accepted token; a grammar that is complete (or a
    token it refuses, which the mask should have made impossible) ends the request."""
    matcher = req.matcher
    if not matcher.accept(token):
        logger.error("request %s: token %d is not allowed by its grammar (%s); stopping it",
                     req.request_id, token, matcher.error())
        req.matcher = None
        if not req.is_finished:
            _finish(req)
        return
    if not req.is_finished and matcher.is_terminated():
        _finish(req)


def _finish(req: Request) -> None:
    from orcinus.engine.output_processor import finish_request
    finish_request(req, FinishReason.STOP, None)
