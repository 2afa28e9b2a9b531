"""LLMEngine: one `step()` is one iteration of Orca's loop.

step(): launch batches chosen by the scheduler until `n_workers` are in flight, wait for the
oldest, append each request's token, detect finished requests and return their outputs that
same iteration. New requests added between steps join at the next iteration.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from orcinus.config import EngineConfig
from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.scheduler import ScheduledBatch, make_scheduler
from orcinus.executor.executor import SingleProcessExecutor
from orcinus.executor.model_runner import ModelRunner
from orcinus.models.loader import load_model
from orcinus.engine.output_processor import OutputProcessor, RequestGroup
from orcinus.errors import EngineStepError
from orcinus.generation_config import GenerationDefaults, load_generation_defaults
from orcinus.request import Request, RequestOutput, RequestRejected
from orcinus.sampler import SamplerOutput
from orcinus.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict
__all__ = ["EngineStats", "EngineStepError", "LLMEngine", "PromptType"]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    iterations_total: int
    last_step_time: float = field(default=0.0)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        loaded = load_model(config.model, self.dtype, self.device)
        self.model_path = loaded.path
        self.model_config = loaded.config
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from orcinus.tokenizer import Tokenizer, TokenizerNotFound

            try:
                self.tokenizer = Tokenizer.from_model_path(config.tokenizer or loaded.path,
                                                           trust_remote_code=config.trust_remote_code)
            except TokenizerNotFound as exc:
                if config.tokenizer is not None:
                    raise  # the user named a tokenizer: not finding it is an error
                # A weights-only checkpoint still serves token-id prompts (vLLM's skip_tokenizer_init).
                logger.warning("%s; running without a tokenizer: prompts must be token ids", exc)
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        self.max_model_len = min(self.max_model_len, loaded.config.max_position_embeddings)
        self.runner = ModelRunner(loaded.model, loaded.config, config, self.device, self.dtype)
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size)
        self.scheduler = make_scheduler(config.scheduler_policy, self.kv_cache, config.max_num_seqs,
                                        self.max_model_len, config.max_num_batched_tokens)
        self.executor = SingleProcessExecutor(self.runner)
        eos = list(loaded.config.eos_token_ids)
        if self.tokenizer is not None:
            eos = sorted(set(eos) | set(self.tokenizer.eos_token_ids))
        self.eos_token_ids = tuple(eos)
        self.generation_defaults: GenerationDefaults = load_generation_defaults(
            config.generation_config, loaded.path, config.override_generation_config,
            _gguf_metadata(loaded.path) if loaded.is_gguf else None)
        self.outputs = OutputProcessor(self.tokenizer)
        self._in_flight: deque[tuple[ScheduledBatch, Future[SamplerOutput]]] = deque()
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.iterations_total = 0
        self.last_step_time = time.monotonic()
        logger.info(
            "orcinus engine: model=%s arch=%s dtype=%s device=%s kv_capacity=%d tokens (%d blocks of %d) "
            "policy=%s max_num_seqs=%d max_model_len=%d",
            self.model_path, loaded.config.architecture, str(self.dtype).removeprefix("torch."), self.device,
            self.kv_cache.n_slots, self.kv_cache.num_blocks, config.block_size, config.scheduler_policy,
            config.max_num_seqs, self.max_model_len,
        )
        logger.info("orcinus engine: sampling defaults for fields a request leaves unset: %s",
                    self.generation_defaults.describe())

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # ------------------------------------------------------------------ requests
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            else:
                raise RequestRejected("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected(
                    "this engine has no tokenizer (skip_tokenizer_init or none in the checkpoint); "
                    "pass {'prompt_token_ids': [...]}", "prompt")
            return prompt, self.tokenizer.encode(prompt)
        else:
            ids, text = prompt, None
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestRejected("prompt_token_ids must be a list of integers", "prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
        return text, list(ids)

    def add_request(self, request_id: str | None, prompt: PromptType,
                    sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises RequestRejected at once if it could never run."""
        params = sampling_params or SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if self.outputs.has(request_id):
            raise RequestRejected(f"request id {request_id!r} is already in use", "request_id")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise RequestRejected("the prompt is empty; give at least one token", "prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestRejected(
                f"the prompt has {len(ids)} tokens but the model's context length is {self.max_model_len}; "
                "shorten the prompt", "prompt")
        max_new = params.max_tokens if params.max_tokens is not None else room
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(i)
            children.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids, sampling_params=child_params, prompt=text,
                arrival_time=arrival, eos_token_ids=self.eos_token_ids, max_new_tokens=max_new,
            ))
        for child in children:  # check all before admitting any
            self.scheduler.check_admissible(child)
        group = RequestGroup(request_id, text, ids, params, children)
        self.outputs.add_group(group)
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def abort_request(self, request_id: str) -> None:
        group = self.outputs.get(request_id)
        if group is None:
            return
        for child in group.children:
            aborted = self.scheduler.abort(child.request_id)
            if aborted is not None:
                self.outputs.on_finished(aborted)
        self.outputs.drop_if_done(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    # ------------------------------------------------------------------ the iteration
    def step(self) -> list[RequestOutput]:
        """One iteration: launch what may run, wait for the oldest batch, return progress."""
        self.last_step_time = time.monotonic()
        while len(self._in_flight) < self.config.n_workers:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            tables = [self.kv_cache.block_table(r.request_id) for r in batch.requests]
            fut = self.executor.execute_async(batch.requests, batch.num_new_tokens, tables)
            self._in_flight.append((batch, fut))
        if not self._in_flight:
            return []
        batch, fut = self._in_flight.popleft()
        try:
            return self._complete_batch(batch, fut.result())
        except BaseException as exc:
            # A failed iteration must not leak blocks or request ids: abort its requests (and their
            # sibling samples), then tell the caller which user requests died. The same for Ctrl-C
            # (KeyboardInterrupt) landing while we wait or append tokens: re-raised as it is, but
            # only once no request of the batch is left RUNNING with nobody to return it.
            failed = {self.outputs.group_id_of(r.request_id) for r in self.scheduler.fail_batch(batch)}
            failed.discard(None)
            for rid in failed:
                self.abort_request(rid)
                self.outputs.drop(rid)
            if not isinstance(exc, Exception):
                raise
            raise EngineStepError(sorted(failed), exc) from exc

    def _complete_batch(self, batch: ScheduledBatch, result: SamplerOutput) -> list[RequestOutput]:
        """A batch came back: append each request's token, let finished requests leave."""
        self.iterations_total += 1
        now = time.monotonic()
        for req, n, tok, lp, top in zip(batch.requests, batch.num_new_tokens, result.token_ids,
                                        result.logprobs, result.top_logprobs):
            if req.num_computed_tokens == 0:
                self.prompt_tokens_total += req.num_prompt_tokens
            req.num_computed_tokens += n
            req.num_iterations += 1
            if req.first_token_time is None:
                req.first_token_time = now
            self.generation_tokens_total += 1
            self.outputs.append_token(req, tok, lp, top, self.max_model_len)
        finished = self.scheduler.finish_batch(batch)
        for req in finished:
            self.outputs.on_finished(req)
        self.last_step_time = time.monotonic()
        return self.outputs.collect(batch.requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage(),
            num_free_blocks=self.kv_cache.num_free_blocks,
            num_blocks=self.kv_cache.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            iterations_total=self.iterations_total,
            last_step_time=self.last_step_time,
        )

    def default_sampling_params(self, **explicit) -> SamplingParams:
        """SamplingParams with the given fields over the model's defaults (None means unset)."""
        return self.generation_defaults.sampling_params(**explicit)

    def free_all_check(self) -> bool:
        """True when no request holds a KV block (used by tests and shutdown)."""
        return self.kv_cache.all_free()


def _gguf_metadata(path: str) -> dict:
    from orcinus.models.gguf_loader import read_gguf_metadata

    return read_gguf_metadata(path)
