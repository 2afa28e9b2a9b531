"""After each iteration: append tokens, detokenise incrementally, detect stops, build outputs.

A user request with n > 1 is a group of n child requests that the scheduler treats as
independent; their completions are gathered back into one RequestOutput here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

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

    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def _finish(req: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
    req.state = RequestState.FINISHED
    req.finish_reason = reason
    req.stop_reason = stop_reason
    req.finished_time = time.monotonic()


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
            from orcinus.tokenizer import IncrementalDetokenizer

            group.detokenizers = [
                IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids, group.params.skip_special_tokens)
                for _ in group.children
            ]
        self._groups[group.request_id] = group
        for child in group.children:
            self._group_of[child.request_id] = group

    # ------------------------------------------------------------------ per token
    def append_token(self, req: Request, token: int, logprob: float, top: dict[int, float] | None,
                     max_model_len: int) -> None:
        params = req.sampling_params
        req.output_token_ids.append(token)
        req.cumulative_logprob += logprob
        if params.logprobs is not None:
            entry = {token: Logprob(token, logprob, self._piece(token))}
            for tid, lp in (top or {}).items():
                if tid not in entry:
                    entry[tid] = Logprob(tid, lp, self._piece(tid))
            req.logprobs.append(entry)
        group = self._group_of[req.request_id]
        before = len(req.output_text)
        if group.detokenizers:
            idx = group.children.index(req)
            req.output_text += group.detokenizers[idx].add_token(token)
        self._check_stop(req, token, before, max_model_len)

    def _piece(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)

    def _check_stop(self, req: Request, token: int, text_before: int, max_model_len: int) -> None:
        params = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return _finish(req, FinishReason.STOP, token)
            if not params.ignore_eos and token in req.eos_token_ids:
                return _finish(req, FinishReason.STOP, None)
            if params.stop:
                longest = max(len(s) for s in params.stop)
                start = max(0, text_before - longest + 1)
                hits = [(req.output_text.find(s, start), s) for s in params.stop]
                hits = [(pos, s) for pos, s in hits if pos >= 0]
                if hits:
                    pos, s = min(hits)
                    req.output_text = req.output_text[:pos + len(s)] if params.include_stop_str_in_output \
                        else req.output_text[:pos]
                    return _finish(req, FinishReason.STOP, s)
        if n_out >= req.max_new_tokens or req.num_tokens >= max_model_len:
            _finish(req, FinishReason.LENGTH)

    def on_finished(self, req: Request) -> None:
        """A request left the scheduler (finished or aborted); flush held-back text."""
        group = self._group_of.get(req.request_id)
        if group is None or not group.detokenizers:
            return
        if req.finish_reason == FinishReason.LENGTH or (req.finish_reason == FinishReason.STOP and
                                                        not isinstance(req.stop_reason, str)):
            req.output_text += group.detokenizers[group.children.index(req)].flush()

    # ------------------------------------------------------------------ outputs
    def _completion(self, group: RequestGroup, i: int, req: Request) -> CompletionOutput:
        text = req.output_text
        if not req.is_finished and group.params.stop:
            # Hold back a possible stop-string prefix so that streamed text is never retracted.
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
