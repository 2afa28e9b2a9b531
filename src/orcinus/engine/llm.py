"""The offline API, in vLLM's shape: `LLM(model=...).generate(prompts, sampling_params)`."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from tqdm.auto import tqdm

from orcinus.config import EngineConfig
from orcinus.engine.llm_engine import LLMEngine, PromptType
from orcinus.request import RequestOutput
from orcinus.sampling_params import SamplingParams

# The server's --default-max-tokens default and the CLI's, for chat without sampling parameters.
DEFAULT_CHAT_MAX_TOKENS = 512


class LLM:
    """Engine settings are the keyword arguments of `EngineConfig` (the CLI's flags too)."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's recommended settings (its generation config, see `generation_config` and
        `override_generation_config`); what `generate` and `chat` use when given none. Adjust a
        copy with dataclasses.replace(llm.get_default_sampling_params(), max_tokens=64)."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Runs all prompts to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            params = [self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts; give one or one per prompt")
        # Validate every prompt before queuing any, so a bad one does not strand the others.
        ids = []
        try:
            for p, sp in zip(prompts, params):
                self._counter += 1
                ids.append(self.engine.add_request(f"gen-{self._counter}", p, sp))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """tools: OpenAI-style [{"type": "function", "function": {...}}]; a template that knows tools
        gets them, any other the generic instructions (read the reply with
        orcinus.tools.parsers.get_parser("json", names)). Constrain with SamplingParams'
        structured_outputs to force a call."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this engine was built with skip_tokenizer_init")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if sampling_params is None:
            sampling_params = self._default_chat_params()
        if not tools:
            return self.generate([tok.chat_prompt(conv) for conv in conversations], sampling_params, use_tqdm)
        from orcinus.tools.tool_prompt import hf_tools, render_messages, template_knows_tools

        functions = [t["function"] if "function" in t else t for t in tools]
        native = template_knows_tools(tok.chat_template)
        extra = {"tools": hf_tools(functions)} if native else {}
        prompts = [tok.chat_prompt(render_messages(conv, functions, native), **extra) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _default_chat_params(self) -> SamplingParams:
        """What the server gives a chat request without max_tokens (README, "Sampling defaults"):
        the model's max_new_tokens, at most DEFAULT_CHAT_MAX_TOKENS, and never more than the
        context leaves after the prompt. OpenAI's 16 (a completions default) cut replies short."""
        params = self.get_default_sampling_params()
        bounds = [b for b in (self.engine.generation_defaults.get("max_tokens"), DEFAULT_CHAT_MAX_TOKENS)
                  if b is not None]
        return dataclasses.replace(params, max_tokens=None, max_tokens_cap=min(bounds))

    def _run(self, ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        show = use_tqdm if use_tqdm is not None else len(ids) > 1
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not show, dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
                bar.set_postfix_str(f"{self.engine.generation_tokens_total} tok", refresh=False)
                if not self.engine.has_unfinished_requests() and len(results) < len(ids):
                    raise RuntimeError("engine went idle with requests outstanding")
        except BaseException:
            for rid in wanted - set(results):
                self.engine.abort_request(rid)
            self._drain()
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    def _drain(self) -> None:
        """Step until the batches still in flight have come back (their requests were aborted)."""
        while self.engine.has_unfinished_requests():
            if not self.engine.step() and self.engine.has_unfinished_requests():
                # Nothing came back and nothing can run: stepping again would spin forever.
                raise RuntimeError("the engine holds requests it can neither run nor return")
