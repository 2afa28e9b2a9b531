"""Constrained decoding in the engine, on a tiny random-weight Llama that uses the default
model's GGUF vocabulary (49152 tokens): random weights make temperature-1 sampling wander over
the whole vocabulary, so only the grammar keeps outputs valid. Under several seeds and n > 1
every output validates; a constrained request gives the same tokens alone, batched with
unconstrained ones, under forced preemption, with and without prefix caching, with chunked
prefill, with two batches in flight and with TP=2 / PP=2 (multiprocess, gloo)."""
from __future__ import annotations

import json
import multiprocessing
import re

import jsonschema
import pytest
import torch

from orcinus.engine.llm_engine import LLMEngine
from orcinus.executor.model_runner import kv_bytes_per_block
from orcinus.models.loader import default_model_path
from orcinus.sampling_params import SamplingParams
from orcinus.structured.params import GrammarError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{1,5}-\d{2}"
CHOICES = ["alpha", "beta gamma", "δ"]
BLOCK = 4
# A shared prefix of several full blocks: what the prefix cache can reuse.
SYSTEM = "You are a careful assistant who always answers in exactly the requested format. "


@pytest.fixture(scope="module")
def vocab_llama(tmp_path_factory) -> str:
    """A 2-layer Llama with SmolLM2's vocabulary size, and SmolLM2's special token ids."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    folder = str(tmp_path_factory.mktemp("vocab-llama"))
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _engine(folder: str, num_blocks: int | None = None, **kw) -> LLMEngine:
    memory = 1 << 24
    if num_blocks is not None:
        probe = LLMEngine.from_kwargs(model=folder, skip_tokenizer_init=True, dtype="float32",
                                      kv_cache_memory=1 << 16, block_size=BLOCK)
        memory = num_blocks * kv_bytes_per_block(probe.model_config, BLOCK, torch.float32)
        probe.shutdown()
    return LLMEngine.from_kwargs(model=folder, tokenizer=default_model_path(), dtype="float32",
                                 kv_cache_memory=memory, block_size=BLOCK, **kw)


def _run(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> dict[str, list]:
    for i, (prompt, sp) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    assert engine.free_all_check()
    return {rid: done[rid] for rid in sorted(done)}


def _constrained(seed: int, n: int = 2) -> list[tuple[str, SamplingParams]]:
    common = dict(temperature=1.0, seed=seed, n=n, max_tokens=120)
    return [
        (SYSTEM + "Give a person:", SamplingParams(**common, structured_outputs={"json": PERSON})),
        (SYSTEM + "A code:", SamplingParams(**common, structured_outputs={"regex": REGEX})),
        (SYSTEM + "Pick one:", SamplingParams(**common, structured_outputs={"choice": CHOICES})),
        (SYSTEM + "Any JSON:", SamplingParams(**common, structured_outputs={"json_object": True})),
    ]


def _check_valid(outputs: dict[str, list], finished_json_object_only: bool = True) -> None:
    for c in outputs["r0"]:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
    for c in outputs["r1"]:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c
    for c in outputs["r2"]:
        assert c.finish_reason == "stop" and c.text in CHOICES, c
    for c in outputs["r3"]:
        if c.finish_reason == "stop":  # free-form JSON may run to max_tokens; what came is a prefix
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.text.startswith("{") and c.finish_reason == "length"


def _tokens(outputs: dict[str, list]) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in outs] for rid, outs in outputs.items()}


@pytest.fixture(scope="module")
def reference(vocab_llama):
    engine = _engine(vocab_llama)
    try:
        return {seed: _run(engine, _constrained(seed)) for seed in (0, 1, 2)}
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_output_valid_under_random_sampling(reference, seed) -> None:
    _check_valid(reference[seed])
    # samples of one request differ (their seeds do): the grammar does not collapse sampling
    assert len({tuple(c.token_ids) for c in reference[seed]["r0"]}) > 1


def test_same_tokens_batched_with_unconstrained(vocab_llama, reference) -> None:
    free = [("Tell me a story", SamplingParams(temperature=1.0, seed=100 + i, max_tokens=30, ignore_eos=True))
            for i in range(4)]
    engine = _engine(vocab_llama, max_num_seqs=16)
    try:
        got = _run(engine, _constrained(1) + free)
    finally:
        engine.shutdown()
    assert _tokens({k: v for k, v in got.items() if k in ("r0", "r1", "r2", "r3")}) == _tokens(reference[1])
    assert all(len(got[f"r{i}"][0].token_ids) == 30 for i in range(4, 8))


@pytest.mark.parametrize("settings", [
    dict(num_blocks=40, max_num_seqs=8),  # forced preemption: recompute keeps the matcher's place
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=8),  # prompts in chunks: a chunk that samples nothing gets no mask
    dict(n_workers=2),  # two batches in flight: a running request is never scheduled ahead
])
def test_same_tokens_under_engine_settings(vocab_llama, reference, settings) -> None:
    preempt = "num_blocks" in settings
    # Under preemption, long unconstrained neighbours make the pool run short.
    free = [("Tell me a story", SamplingParams(temperature=1.0, seed=200 + i, max_tokens=60, ignore_eos=True))
            for i in range(4)] if preempt else []
    engine = _engine(vocab_llama, **settings)
    try:
        got = _run(engine, _constrained(2) + free)
        if preempt:
            assert engine.stats().num_preemptions_total > 0
    finally:
        engine.shutdown()
    assert _tokens({k: v for k, v in got.items() if k in ("r0", "r1", "r2", "r3")}) == _tokens(reference[2])


def test_prefix_cache_hit_gives_same_tokens(vocab_llama, reference) -> None:
    engine = _engine(vocab_llama)
    try:
        _run(engine, _constrained(2))
        again = _run(engine, _constrained(2))
        assert engine.kv_cache.prefix_hits > 0
    finally:
        engine.shutdown()
    assert _tokens(again) == _tokens(reference[2])


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_tensor_and_pipeline_parallel_same_as_alone(vocab_llama, reference, tp, pp) -> None:
    engine = _engine(vocab_llama, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        got = _run(engine, _constrained(0))
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()
    assert _tokens(got) == _tokens(reference[0])


def test_stop_string_and_abort_keep_the_engine_consistent(vocab_llama) -> None:
    engine = _engine(vocab_llama)
    try:
        # a stop string inside the grammar's language ends the request early, with stop
        out = _run(engine, [("x", SamplingParams(temperature=1.0, seed=3, max_tokens=50, stop=["-"],
                                                  structured_outputs={"regex": REGEX}))])
        (c,) = out["r0"]
        assert c.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{1,5}", c.text)
        # aborted while in flight: its token is discarded, the engine keeps no block
        engine.add_request("a", "x", SamplingParams(temperature=1.0, seed=4, max_tokens=50,
                                                     structured_outputs={"json": PERSON}))
        engine.step()
        engine.abort_request("a")
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.free_all_check()
        # the next constrained request is unaffected
        _check_valid(_run(engine, _constrained(1)))
    finally:
        engine.shutdown()


def test_compile_cache_and_errors(vocab_llama) -> None:
    engine = _engine(vocab_llama)
    try:
        sp = SamplingParams(max_tokens=4, structured_outputs={"json": PERSON})
        engine.add_request("a", "x", sp)
        engine.add_request("b", "y", SamplingParams(max_tokens=4, structured_outputs={"json": json.dumps(PERSON)}))
        assert engine.structured.compiles_total == 1  # the same schema is compiled once
        for bad, words in [({"json": {"type": "foo"}}, "foo"), ({"regex": "(a"}, "regex"),
                           ({"grammar": "start: ("}, "grammar")]:
            with pytest.raises(GrammarError, match=words):
                engine.add_request("c", "z", SamplingParams(max_tokens=4, structured_outputs=bad))
        assert not engine.outputs.has("c")
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.free_all_check()
    finally:
        engine.shutdown()


def test_logit_bias_steers_and_is_validated(vocab_llama) -> None:
    engine = _engine(vocab_llama)
    try:
        out = _run(engine, [("x", SamplingParams(temperature=1.0, seed=1, max_tokens=5, ignore_eos=True,
                                                  logit_bias={77: 100.0}))])
        assert out["r0"][0].token_ids == [77] * 5
        from orcinus.request import RequestRejected
        with pytest.raises(RequestRejected, match="logit_bias"):
            engine.add_request("bad", "x", SamplingParams(logit_bias={49152: 1.0}))
    finally:
        engine.shutdown()


def test_offline_chat_with_tools_and_a_forced_call(default_llm) -> None:
    """LLM.chat(tools=...): the tools reach the prompt; a required call is forced with the spec
    the server uses, and the generic parser reads the result."""
    from orcinus.tools.parsers import get_parser
    from orcinus.tools.tool_choice import Function, required_spec

    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    spec = required_spec([Function("get_weather", None, params)], parallel=False)
    out = default_llm.chat([{"role": "user", "content": "Weather in Paris?"}],
                           SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec), tools=tools)
    text = out[0].outputs[0].text
    assert "get_weather" in out[0].prompt
    (call,) = get_parser("json", ["get_weather"]).parse(text).calls
    jsonschema.validate(json.loads(call.arguments), params)


def test_default_model_json_schema_n2(default_llm) -> None:
    """The default model (SmolLM2 GGUF) through LLM.chat: both samples validate."""
    outs = default_llm.chat([{"role": "user", "content": "Give me a person as JSON."}],
                            SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=80,
                                           structured_outputs={"json": PERSON}))
    for c in outs[0].outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)
