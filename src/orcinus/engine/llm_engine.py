"""LLMEngine: one `step()` is one iteration of Orca's loop.

step(): launch batches chosen by the scheduler until `n_workers` are in flight, wait for the
oldest, append each request's token and decide the stops that need no text, launch the next
iteration, and only then do the text work (detokenisation, log-prob text, stop strings) while
that iteration runs; return the outputs, finished requests in that same iteration. New requests
added between steps join at the next launch.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from orcinus.config import EngineConfig
from orcinus.errors import ConfigError
from orcinus.core.kv_cache import KVCacheManager
from orcinus.core.policies import make_scheduler
from orcinus.core.scheduler import ScheduledBatch
from orcinus.engine.batch_messages import MessageBuilder
from orcinus.engine.iteration_stats import EngineStats, IterationObserver, IterationStats, LaunchedBatch, StepPhases
from orcinus.executor.messages import BatchMessage, PromptLogprobsChunk, SamplerOutput
from orcinus.engine.output_processor import OutputProcessor, RequestGroup, finish_request
from orcinus.errors import EngineStepError
from orcinus.generation_config import GenerationDefaults, load_generation_defaults
from orcinus.errors import WorkerDied
from orcinus.executor.executor import Executor
from orcinus.executor.factory import make_executor
from orcinus.request import FinishReason, Request, RequestOutput, RequestRejected, RequestState
from orcinus.sampling_params import SamplingParams
from orcinus.engine.structured_hooks import accept_token, attach_bitmask, check_logit_bias, make_matchers
from orcinus.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict
__all__ = ["EngineStats", "EngineStepError", "LLMEngine", "PromptType"]


@dataclass
class _InFlight:
    batch: ScheduledBatch
    message: BatchMessage
    future: Future[SamplerOutput]
    # prompt log-probs its iteration computed, by request id (rows that sampled or not)
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)


def _launched(batch: ScheduledBatch) -> LaunchedBatch:
    # Counted as scheduled: num_computed_tokens already includes a cached prefix found at admission.
    prompt = sampled = kv = 0
    keys = 0.0
    for req, n in zip(batch.requests, batch.num_new_tokens):
        c = req.num_computed_tokens
        prompt += max(0, min(c + n, req.num_prompt_tokens) - c)
        sampled += req.samples_after(n)
        keys += n * c + n * (n + 1) / 2
        kv += c + n
    return LaunchedBatch(len(batch.requests), sum(batch.num_new_tokens), prompt, sampled, keys, kv)


def _rows_of(result: SamplerOutput) -> list[tuple[int, float, dict | None]]:
    return list(zip(result.token_ids, result.logprobs, result.top_logprobs))


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        """`executor`: the one to drive (tests give a scripted one); by default `make_executor`'s.
        The executor loads the model on every rank and sizes the KV pool; the engine only learns
        what the workers resolved (`executor.info`: model shape, device, dtype) and how many
        blocks it may hand out. Its `execute_async` returns at once (an in-process executor runs
        iterations on a thread of its own), so text work overlaps the next iteration."""
        self.config = config
        self.executor: Executor = executor if executor is not None else make_executor(config)
        info = self.executor.info
        self.device = torch.device(info.device)
        self.dtype: torch.dtype = getattr(torch, info.dtype)
        self.model_path = self.executor.model_path
        self.model_config = model_config = self.executor.model_config
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from orcinus.tokenizer import Tokenizer, TokenizerNotFound

            try:
                self.tokenizer = Tokenizer.from_model_path(config.tokenizer or self.model_path,
                                                           trust_remote_code=config.trust_remote_code)
            except TokenizerNotFound as exc:
                if config.tokenizer is not None:
                    raise  # the user named a tokenizer: not finding it is an error
                # A weights-only checkpoint still serves token-id prompts (vLLM's skip_tokenizer_init).
                logger.warning("%s; running without a tokenizer: prompts must be token ids", exc)
        if config.max_model_len is not None and config.max_model_len > model_config.max_position_embeddings:
            self.shutdown()
            raise ConfigError(f"max_model_len={config.max_model_len} is more than the model's context of "
                              f"{model_config.max_position_embeddings} tokens (its max_position_embeddings); use at "
                              "most that, or leave it out for the model's own")
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.kv_cache = KVCacheManager(self.executor.num_blocks, config.block_size,
                                       enable_prefix_caching=config.resolved_prefix_caching())
        self.scheduler = make_scheduler(config.scheduler_policy, self.kv_cache, config.max_num_seqs,
                                        self.max_model_len,
                                        config.resolved_max_num_batched_tokens(self.device))
        self.messages = MessageBuilder(self.kv_cache)
        eos = list(model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos = sorted(set(eos) | set(self.tokenizer.eos_token_ids))
        self.eos_token_ids = tuple(eos)
        self.generation_defaults: GenerationDefaults = load_generation_defaults(
            config.generation_config, self.model_path, config.override_generation_config,
            info.gguf_sampling or None)
        self.outputs = OutputProcessor(self.tokenizer)
        # Structured outputs: grammars compiled once per spec, one matcher per constrained request.
        self.structured = StructuredOutputManager(self.tokenizer, self.eos_token_ids)
        self._in_flight: deque[_InFlight] = deque()
        # requests aborted while in a launched batch: their token from it is discarded
        self._aborted_in_flight: set[str] = set()
        # outputs of an iteration whose step() raised EngineStepError for other requests
        self._deferred: list[RequestOutput] = []
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.iterations_total = 0
        self.last_step_time = time.monotonic()
        self._observers: list[IterationObserver] = []
        self._launched: list[LaunchedBatch] | None = None  # batches launched in this step, when observed
        self._phase_observers: list[IterationObserver] = []  # observers that asked for phase timings
        self._phases: StepPhases | None = None  # this step's, while such an observer is registered
        logger.info(
            "orcinus engine: model=%s arch=%s dtype=%s%s device=%s kv_capacity=%d tokens (%d blocks of %d, %s%s) "
            "policy=%s max_num_seqs=%d max_model_len=%d max_num_batched_tokens=%s prefix_caching=%s cuda_graphs=%s",
            self.model_path, model_config.architecture, str(self.dtype).removeprefix("torch."),
            info.dtype_note, self.device,
            self.kv_cache.n_slots, self.kv_cache.num_blocks, config.block_size, info.kv_dtype or "?",
            " (kv_cache_dtype=auto: half a float32 pool beside GGUF blocks)" if config.kv_cache_dtype == "auto"
            and info.kv_dtype == "float16" and str(self.dtype) == "torch.float32" else "",
            config.scheduler_policy,
            config.max_num_seqs, self.max_model_len, self.scheduler.max_num_batched_tokens,
            "on" if self.kv_cache.enable_prefix_caching else "off",
            info.cuda_graphs,
        )
        logger.info("orcinus engine: sampling defaults for fields a request leaves unset: %s",
                    self.generation_defaults.describe())
        if self.device.type == "cpu":
            from orcinus.thread_policy import engine_note

            logger.info("orcinus engine: %s", engine_note(config.cpu_thread_policy))
        # What exists now (the model's modules, tokenizer tables, imported libraries: ~180,000
        # objects) lives as long as the engine. Frozen, the collector stops walking it at every full
        # collection: gc_collect_main was ~3 % of the CPU samples of a 2-core CPU trace run.
        gc.collect()
        gc.freeze()

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
        check_logit_bias(params, self.model_config.vocab_size)
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise RequestRejected("the prompt is empty; give at least one token", "prompt")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestRejected(
                f"the prompt has {len(ids)} tokens but the model's context length is {self.max_model_len}; "
                "shorten the prompt", "prompt")
        if params.max_tokens is not None:
            max_new = params.max_tokens
        else:  # up to the context, or a default bound that fits what the context has room for
            max_new = room if params.max_tokens_cap is None else min(room, params.max_tokens_cap)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(i)
            if i > 0 and child_params.prompt_logprobs is not None:
                # the samples share one prompt: the first child computes its log-probs, the others
                # may reuse its KV from the prefix cache
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            children.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids, sampling_params=child_params, prompt=text,
                arrival_time=arrival, eos_token_ids=self.eos_token_ids, max_new_tokens=max_new,
                prompt_logprobs=[None] if child_params.prompt_logprobs is not None else [],
            ))
        for child in children:  # check all before admitting any
            self.scheduler.check_admissible(child)
        make_matchers(self.structured, params, children)  # compiles, or finds the cached grammar
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
            if child.state == RequestState.RUNNING:
                self._aborted_in_flight.add(child.request_id)
            aborted = self.scheduler.abort(child.request_id)
            if aborted is not None:
                self.messages.forget(aborted.request_id)
        self.outputs.drop_if_done(request_id)
        self._flush_drops_if_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight) or bool(self._deferred)

    # ------------------------------------------------------------------ the iteration
    def add_observer(self, observer: IterationObserver, phases: bool = False) -> None:
        """Call `observer(IterationStats)` after every step() that returns (on this thread).
        `phases`: time the step's phases for it, the workers' included (`StepPhases`)."""
        self._observers.append(observer)
        if phases:
            self._phase_observers.append(observer)

    def remove_observer(self, observer: IterationObserver) -> None:
        self._observers.remove(observer)
        if observer in self._phase_observers:
            self._phase_observers.remove(observer)

    def step(self) -> list[RequestOutput]:
        """One iteration: launch what may run, wait for the oldest batch, append its tokens,
        launch the next iteration, then make the text while that runs; return progress.

        A request whose own parameters make its iteration fail is aborted alone (its blocks
        freed) and reported by EngineStepError; the rest of its batch still gets its token,
        returned by this call or, when it raises, by the next one."""
        if not self._observers:
            return self._step()
        self._launched = launched = []
        self._phases = phases = StepPhases() if self._phase_observers else None
        t0 = self._tick()
        try:
            outputs = self._step()
        finally:
            self._launched, self._phases = None, None
        if phases is not None:
            phases.step_s = time.perf_counter() - t0
        iteration = IterationStats(launched, self.stats(), phases)
        for observer in list(self._observers):
            observer(iteration)
        return outputs

    def _step(self) -> list[RequestOutput]:
        self.last_step_time = time.monotonic()
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            return deferred
        self._launch()
        if not self._in_flight:
            return []
        flight = self._in_flight.popleft()
        tokens, failed = self._collect(flight)
        progressed, finished = self._append(flight, tokens, set(failed))
        # Who runs next is decided: launch it now, and do the text work while it runs.
        self._launch()
        t = self._tick()
        outputs = self._make_text(flight, progressed, finished)
        self._tock("output processing (detokenisation)", t)
        self.last_step_time = time.monotonic()
        if failed:
            self._raise_failed(flight, failed, outputs)
        self._flush_drops_if_idle()
        return outputs

    # Each way an iteration can go wrong has one home below, with the rule that keeps the engine
    # consistent (every request finished, returned or aborted with its blocks freed).
    def _collect(self, flight: _InFlight) -> tuple[dict[str, tuple], dict[str, BaseException]]:
        """The batch's tokens by request id, and the requests that failed on their own.

        A worker that died: every batch in flight is aborted and WorkerDied raised (nothing can
        run any more). Any other error: the batch is re-run in halves to find the requests that
        cause it (`_rerun_isolated`). Ctrl-C or exit while waiting: the batch's outcome is
        unknown, so all of it is aborted (blocks freed, ids forgotten by workers)."""
        try:
            t = self._tick()
            result = self._wait_for(flight)
            self._tock("waiting for the iteration", t)
            if self._phases is not None and result.phases is not None:
                self._phases.worker.append(result.phases)
            flight.prompt_logprobs.update(result.prompt_logprobs)
            return dict(zip(flight.message.sampled_ids, _rows_of(result))), {}
        except WorkerDied:
            self._abort_all_in_flight(flight)
            raise
        except Exception as exc:
            try:
                return self._rerun_isolated(flight, exc)
            except WorkerDied:  # died while re-running
                self._abort_all_in_flight(flight)
                raise
        except BaseException:
            self._abort_failed(flight.batch, {r.request_id for r in flight.batch.requests})
            raise

    def _append(self, flight: _InFlight, tokens: dict[str, tuple], failed: set[str]
                ) -> tuple[list[Request], list[Request]]:
        """Append the tokens and settle the stops that need no text. Ctrl-C halfway: the whole
        batch is aborted rather than some of it left RUNNING with nobody to return it."""
        try:
            return self._append_tokens(flight.batch, tokens, failed, flight.prompt_logprobs)
        except BaseException:
            self._abort_failed(flight.batch, {r.request_id for r in flight.batch.requests
                                              if not r.is_finished or r.request_id in self.scheduler.pool})
            raise

    def _make_text(self, flight: _InFlight, progressed: list[Request], finished: list[Request]
                   ) -> list[RequestOutput]:
        """The outputs, text included. Ctrl-C (or a tokenizer error) halfway: these requests are
        aborted; those already in the batch just launched leave when it returns."""
        try:
            return self._text_outputs(progressed, finished)
        except BaseException:
            for gid in {self.outputs.group_id_of(r.request_id) for r in flight.batch.requests} - {None}:
                self.abort_request(gid)
            raise

    def _raise_failed(self, flight: _InFlight, failed: dict[str, BaseException],
                      outputs: list[RequestOutput]) -> None:
        """Requests that failed on their own are aborted (blocks freed) and reported by one
        EngineStepError; the rest of the batch's outputs are returned by the next step()."""
        self._deferred = outputs
        cause = next(iter(failed.values()))
        aborted = self._abort_failed(flight.batch, set(failed))
        self._flush_drops_if_idle()
        error = EngineStepError(aborted, cause)
        # Every request of a batch of several failed on its own: not one request's parameters
        # but the device or the model (the server counts these to decide it is broken).
        error.whole_batch = len(failed) == len(flight.batch.requests) > 1
        raise error from cause

    def _wait_for(self, flight: _InFlight) -> SamplerOutput:
        """Wait for a launched iteration."""
        return flight.future.result()

    # Phase timing (StepPhases) for observers that asked for it; no clock is read otherwise.
    def _tick(self) -> float:
        return time.perf_counter() if self._phases is not None else 0.0

    def _tock(self, phase: str, since: float) -> None:
        if self._phases is not None:
            self._phases.add(phase, since)

    def _abort_all_in_flight(self, flight: _InFlight) -> None:
        """Nothing can run any more: fail every batch in flight, leaving the engine consistent."""
        self._abort_failed(flight.batch, {r.request_id for r in flight.batch.requests})
        while self._in_flight:
            other = self._in_flight.popleft()
            self._abort_failed(other.batch, {r.request_id for r in other.batch.requests})

    def _flush_drops_if_idle(self) -> None:
        """With no batch to carry them, tell workers now which requests to forget, so that an
        idle engine leaves no per-request state behind on the workers."""
        if self._in_flight or self.scheduler.has_unfinished() or not self.messages.pending_drops:
            return
        msg = self.messages.drops_only()
        try:
            self.executor.execute_async(msg).result()
        except Exception:  # not worth failing anyone over: the next message carries them again
            logger.warning("could not tell the workers to drop finished requests", exc_info=True)
            self.messages.requeue_drops(msg.finished_ids)

    def _launch(self) -> None:
        # Orca's n_workers: one batch per pipeline stage keeps every stage busy (no micro-batches).
        while len(self._in_flight) < max(self.config.n_workers, self.config.pipeline_parallel_size):
            t = self._tick()
            batch = self.scheduler.schedule()
            self.messages.preempted(self.scheduler.take_preempted())
            if batch is None:
                self._tock("scheduling", t)
                break
            if self._launched is not None:
                self._launched.append(_launched(batch))
            msg = self.messages.build(batch)
            attach_bitmask(self.structured, msg, batch)  # the grammar masks: part of the message
            msg.timed = self._phases is not None
            self._tock("scheduling", t)
            self._in_flight.append(_InFlight(batch, msg, self.executor.execute_async(msg)))

    def _rerun_isolated(self, flight: _InFlight, exc: Exception
                        ) -> tuple[dict[str, tuple[int, float, dict | None]], dict[str, BaseException]]:
        """The batch failed as a whole; the workers rolled it back. Re-run it in halves until each
        failing request stands alone: only those are failed, the others keep their tokens."""
        logger.warning("iteration %d failed (%s: %s); re-running its %d requests in isolation",
                       flight.batch.batch_id, type(exc).__name__, exc, len(flight.message.requests))
        tokens: dict[str, tuple[int, float, dict | None]] = {}
        failed: dict[str, BaseException] = {}
        pending = [(flight.message.requests, exc)]
        while pending:
            entries, error = pending.pop()
            if len(entries) == 1:
                failed[entries[0].request_id] = error
                continue
            for half in (entries[:len(entries) // 2], entries[len(entries) // 2:]):
                msg = self.messages.retry(flight.batch.batch_id, half)
                if flight.message.token_bitmask is not None:
                    msg.token_bitmask = flight.message.token_bitmask.select(msg.sampled_ids)
                try:
                    result = self.executor.execute_async(msg).result()
                    tokens.update(zip(msg.sampled_ids, _rows_of(result)))
                    flight.prompt_logprobs.update(result.prompt_logprobs)
                except WorkerDied:
                    raise
                except Exception as sub_exc:
                    pending.append((half, sub_exc))
        return tokens, failed

    def _append_tokens(self, batch: ScheduledBatch, tokens: dict, failed: set[str],
                       prompt_logprobs: dict[str, PromptLogprobsChunk] | None = None
                       ) -> tuple[list[Request], list[Request]]:
        """The critical path: append each request's token, decide the stops that need no text,
        retire the batch (finished requests leave, blocks freed). Returns (requests that
        progressed, requests that left)."""
        t = self._tick()
        if len(failed) < len(batch.requests):
            self.iterations_total += 1
        now = time.monotonic()
        progressed: list[Request] = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            if req.request_id in failed:
                continue
            req.num_computed_tokens += n
            req.num_iterations += 1
            chunk = (prompt_logprobs or {}).get(req.request_id)
            if chunk is not None:  # any row of a request that asked, prompt chunk or not
                self.outputs.append_prompt_logprobs(req, chunk)
            if req.stop_string_hit is not None:
                # Its text reached a stop string after this batch was launched: a token from this
                # batch is past the end, never emitted or counted; the request finishes now.
                finish_request(req, FinishReason.STOP, req.stop_string_hit)
                progressed.append(req)
                continue
            if req.request_id not in tokens:
                continue  # a prompt chunk short of the end: its KV is written, no token yet
            if req.request_id in self._aborted_in_flight:
                continue  # aborted after this batch was launched: its token goes nowhere
            if req.first_token_time is None:
                req.first_token_time = now
                self.prompt_tokens_total += req.num_prompt_tokens
            tok, lp, top = tokens[req.request_id]
            self.generation_tokens_total += 1
            self.outputs.append_token(req, tok, lp, top, self.max_model_len)
            if req.matcher is not None:
                accept_token(req, tok)  # a complete grammar finishes the request (stop)
            progressed.append(req)
        self._tock("output tokens and stops", t)
        t = self._tick()
        survivors = ScheduledBatch(batch.batch_id, [r for r in batch.requests if r.request_id not in failed],
                                   [n for r, n in zip(batch.requests, batch.num_new_tokens)
                                    if r.request_id not in failed])
        finished = self.scheduler.finish_batch(survivors)
        for req in finished:
            self.messages.forget(req.request_id)
            self._aborted_in_flight.discard(req.request_id)
        self._tock("scheduling", t)
        return progressed, finished

    def _text_outputs(self, progressed: list[Request], finished: list[Request]) -> list[RequestOutput]:
        """Off the critical path (the next iteration is already running): text, stop strings,
        outputs."""
        for req in self.outputs.process_text(progressed):
            self._finish_stopped(req)
        outputs = self.outputs.collect(progressed)
        for req in finished:  # groups of requests that left with no output (aborted in flight)
            gid = self.outputs.group_id_of(req.request_id)
            if gid is not None:
                self.outputs.drop_if_done(gid)
        return outputs

    def _finish_stopped(self, req: Request) -> None:
        """A running request whose text reached a stop string. If the batch just launched holds
        it, it finishes when that batch returns (its token there is discarded); otherwise now."""
        if req.state == RequestState.RUNNING:
            return
        if self.scheduler.abort(req.request_id) is not None:  # releases its blocks at once
            self.messages.forget(req.request_id)
        finish_request(req, FinishReason.STOP, req.stop_string_hit)

    def _abort_failed(self, batch: ScheduledBatch, failed: set[str]) -> list[str]:
        """Abort the failed requests (and their sibling samples), free their blocks; returns the
        user-visible ids."""
        doomed = [r for r in batch.requests if r.request_id in failed]
        n = [n for r, n in zip(batch.requests, batch.num_new_tokens) if r.request_id in failed]
        for req in self.scheduler.fail_batch(ScheduledBatch(batch.batch_id, doomed, n)):
            self.messages.forget(req.request_id)
            self._aborted_in_flight.discard(req.request_id)
        groups = {self.outputs.group_id_of(r.request_id) for r in doomed}
        groups.discard(None)
        for gid in groups:
            self.abort_request(gid)
            self.outputs.drop(gid)
        return sorted(groups)

    def shutdown(self) -> None:
        self.executor.shutdown()

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
            num_preemptions_total=getattr(self.scheduler, "num_preemptions", 0),
            prefix_cache_queries_total=self.kv_cache.prefix_queries,
            prefix_cache_hits_total=self.kv_cache.prefix_hits,
            kv_real_token_slots=self.kv_cache.real_token_slots(
                {rid: r.num_computed_tokens for rid, r in self.scheduler.pool.items()}),
            kv_allocated_slots=self.kv_cache.num_reserved_slots(),
        )

    def default_sampling_params(self, **explicit) -> SamplingParams:
        """SamplingParams with the given fields over the model's defaults (None means unset)."""
        return self.generation_defaults.sampling_params(**explicit)

    def free_all_check(self) -> bool:
        """True when no request holds a KV block (used by tests and shutdown)."""
        return self.kv_cache.all_free()
