"""After each iteration: append tokens, detokenise incrementally, detect stops, build outputs.

The work is split in two so that the engine can launch the next iteration in between:
`append_token` (token ids, log-prob numbers, and the stops that need no text: EOS, stop token
ids, max_tokens, the context length) decides who runs next and stays on the critical path;
`process_text` (detokenisation, the text of log-prob entries, stop strings) runs while the next
iteration computes. A stop string found there is reported back to the engine, which finishes the
request (see `LLMEngine._finish_stopped`).

A user request with n > 1 is a group of n child requests that the scheduler treats as
independent; their completions are gathered back into one RequestOutput here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from orcinus.executor.messages import PromptLogprobsChunk
from orcinus.request import (CompletionOutput, FinishReason, Logprob, Request, RequestMetrics,
                             RequestOutput, RequestRejected, RequestState)
from orcinus.sampling_params import SamplingParams


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list = field(default_factory=list)
    # per child: output tokens whose text (and log-prob entry text) has been produced
    text_tokens: list[int] = field(default_factory=list)
    # prompt log-prob entries (of children[0], the child that computes them) whose text is set
    prompt_named: int = 0

    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def finish_request(req: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
    req.state = RequestState.FINISHED
    req.finish_reason = reason
    req.stop_reason = stop_reason
    req.finished_time = time.monotonic()


def _logprob_entry(token: int, logprob: float, rank: int | None,
                   alternatives: Iterable[tuple[int, float]]) -> dict[int, Logprob]:
    """One position's entry: the token itself first, then the alternatives (best first, ranked
    from 1) that are not it."""
    entry = {token: Logprob(token, logprob, None, rank)}
    for k, (tid, lp) in enumerate(alternatives, 1):
        if tid not in entry:
            entry[tid] = Logprob(tid, lp, None, k)
    return entry


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, RequestGroup] = {}
        self._group_of: dict[str, RequestGroup] = {}

    def has(self, request_id: str) -> bool:
        return request_id in self._groups

    def get(self, request_id: str) -> RequestGroup | None:
        return self._groups.get(request_id)

    def add_group(self, group: RequestGroup) -> None:
        if group.params.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer; use stop_token_ids instead", "stop")
        if self.tokenizer is not None:
            group.detokenizers = [
                self.tokenizer.incremental_detokenizer(group.prompt_token_ids, group.params.skip_special_tokens)
                for _ in group.children
            ]
        group.text_tokens = [0] * len(group.children)
        self._groups[group.request_id] = group
        for child in group.children:
            self._group_of[child.request_id] = group

    # ------------------------------------------------------------------ per token (critical path)
    def append_token(self, req: Request, token: int, logprob: float, top: dict[int, float] | None,
                     max_model_len: int) -> None:
        """Append a sampled token and decide the stops that need no text. The text of the token,
        of its log-prob entries and the stop strings wait for `process_text`."""
        params = req.sampling_params
        req.output_token_ids.append(token)
        req.cumulative_logprob += logprob
        if params.logprobs is not None:
            alternatives = list((top or {}).items())  # best first
            rank = next((k for k, (tid, _) in enumerate(alternatives, 1) if tid == token), None)
            req.logprobs.append(_logprob_entry(token, logprob, rank, alternatives))
        n_out = len(req.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return finish_request(req, FinishReason.STOP, token)
            if not params.ignore_eos and token in req.eos_token_ids:
                return finish_request(req, FinishReason.STOP, None)
        if n_out >= req.max_new_tokens or req.num_tokens >= max_model_len:
            finish_request(req, FinishReason.LENGTH)

    @staticmethod
    def append_prompt_logprobs(req: Request, chunk: PromptLogprobsChunk) -> None:
        """Entries for the prompt tokens an iteration scored. A recomputation (preemption, a retried
        batch) may score tokens again: the entries already held are kept, only new ones appended."""
        have = len(req.prompt_logprobs)
        if chunk.start > have:  # would leave a hole: never sent that way (see MessageBuilder)
            raise AssertionError(f"{req.request_id}: prompt log-probs from {chunk.start}, {have} held")
        skip = have - chunk.start
        prompt = req.prompt_token_ids
        own, ranks = chunk.token_logprobs.tolist(), chunk.ranks.tolist()
        top_ids, top_lps = chunk.top_ids.tolist(), chunk.top_logprobs.tolist()
        for i in range(skip, len(own)):
            tok = prompt[chunk.start + i]
            req.prompt_logprobs.append(_logprob_entry(tok, own[i], ranks[i], zip(top_ids[i], top_lps[i])))

    # ------------------------------------------------------------------ text (off the critical path)
    def process_text(self, requests: list[Request]) -> list[Request]:
        """Text for the tokens appended since the last call: detokenise, name the log-prob entries,
        look for stop strings, flush what finished requests held back. Returns the requests that
        were still running when their text reached a stop string: their text is cut and
        `stop_string_hit` set; the engine finishes them."""
        stopped: list[Request] = []
        self._name_logprobs(requests)
        for req in requests:
            group = self._group_of.get(req.request_id)
            if group is None:
                continue
            i = group.children.index(req)
            done = group.text_tokens[i]
            new = req.output_token_ids[done:]
            group.text_tokens[i] = len(req.output_token_ids)
            if not group.detokenizers or not new:
                continue
            detok = group.detokenizers[i]
            before = len(req.output_text)
            for token in new:  # one per iteration (a request is in one batch at a time)
                req.output_text += detok.add_token(token)
            hit = self._find_stop(req, before)
            if hit is None:
                if req.finish_reason == FinishReason.LENGTH or (req.finish_reason == FinishReason.STOP and
                                                                not isinstance(req.stop_reason, str)):
                    req.output_text += detok.flush()  # e.g. invalid bytes at the end, as decode renders them
            elif req.is_finished:  # by length on this very token: the stop string wins, as it always did
                finish_request(req, FinishReason.STOP, hit)
            else:
                req.stop_string_hit = hit
                stopped.append(req)
        return stopped

    def _name_logprobs(self, requests: list[Request]) -> None:
        """The text of every new log-prob entry, from the tokenizer's piece cache in one call."""
        if self.tokenizer is None:
            return
        entries = []
        for req in requests:
            group = self._group_of.get(req.request_id)
            if group is None:
                continue
            if group.prompt_named < len(req.prompt_logprobs):  # once, with the first token
                for entry in req.prompt_logprobs[max(1, group.prompt_named):]:
                    entries.extend(entry.values())
                group.prompt_named = len(req.prompt_logprobs)
            if req.sampling_params.logprobs is None:
                continue
            done = group.text_tokens[group.children.index(req)]
            for entry in req.logprobs[done:]:
                entries.extend(entry.values())
        if entries:
            for lp, piece in zip(entries, self.tokenizer.token_pieces([lp.token_id for lp in entries])):
                lp.decoded = piece

    def _find_stop(self, req: Request, text_before: int) -> str | None:
        """The stop string the text after `text_before` reached, cutting the text there. Not when
        the newest token ended the request by EOS or a stop token id (those come first)."""
        params = req.sampling_params
        if not params.stop or len(req.output_token_ids) < params.min_tokens:
            return None
        if req.finish_reason is not None and req.finish_reason != FinishReason.LENGTH:
            return None
        longest = max(len(s) for s in params.stop)
        start = max(0, text_before - longest + 1)
        hits = [(req.output_text.find(s, start), s) for s in params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return None
        pos, s = min(hits)
        req.output_text = req.output_text[:pos + len(s)] if params.include_stop_str_in_output \
            else req.output_text[:pos]
        return s

    # ------------------------------------------------------------------ outputs
    def _completion(self, group: RequestGroup, i: int, req: Request) -> CompletionOutput:
        text = req.output_text
        if not req.is_finished and group.params.stop and req.stop_string_hit is None:
            # Hold back a possible stop-string prefix so that streamed text is never retracted.
            # (Text cut at a stop string is final, even while the request waits to finish.)
            hold = max(len(s) for s in group.params.stop) - 1
            text = text[:max(0, len(text) - hold)]
        return CompletionOutput(
            index=i, text=text, token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if group.params.logprobs is not None else None,
            logprobs=list(req.logprobs) if group.params.logprobs is not None else None,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason,
        )

    def output_of(self, group: RequestGroup) -> RequestOutput:
        first = group.children[0]
        firsts = [c.first_token_time for c in group.children if c.first_token_time is not None]
        ends = [c.finished_time for c in group.children if c.finished_time is not None]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=[self._completion(group, i, c) for i, c in enumerate(group.children)],
            finished=group.finished(),
            # complete once a first token came (only then is there an output); not copied: no
            # entry is added after that
            prompt_logprobs=first.prompt_logprobs if group.params.prompt_logprobs is not None else None,
            metrics=RequestMetrics(first.arrival_time, min(firsts) if firsts else None,
                                   max(ends) if group.finished() and ends else None,
                                   max(c.num_iterations for c in group.children)),
        )

    def collect(self, requests: list[Request]) -> list[RequestOutput]:
        """One output per group that made progress this iteration; finished groups are dropped."""
        seen: dict[str, RequestGroup] = {}
        for req in requests:
            group = self._group_of.get(req.request_id)
            if group is not None:
                seen[group.request_id] = group
        outs = [self.output_of(g) for g in seen.values()]
        for g in seen.values():
            if g.finished():
                self._drop(g)
        return outs

    def drop_if_done(self, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is not None and group.finished():
            self._drop(group)

    def group_id_of(self, child_request_id: str) -> str | None:
        group = self._group_of.get(child_request_id)
        return None if group is None else group.request_id

    def drop(self, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is not None:
            self._drop(group)

    def _drop(self, group: RequestGroup) -> None:
        self._groups.pop(group.request_id, None)
        for c in group.children:
            self._group_of.pop(c.request_id, None)
