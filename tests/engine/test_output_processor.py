"""Text off the critical path: the engine launches the next iteration before it detokenises, yet
every request's text is `decode` of its output ids, stop strings cut exactly where they did, and a
token computed past a stop string is never emitted, counted or left holding KV blocks.

The model is a tiny random Llama with SmolLM2's vocabulary and real tokenizer; what it "says" is
scripted by the sampler (the real sampler runs, then the scripted token replaces its choice), so
that the outputs hold the hard cases on purpose: emoji and CJK split across tokens, special
tokens, an unfinished character at the end. `Tokenizer.decode` is the oracle for the text."""
from __future__ import annotations

import collections

import pytest
import torch

from orcinus.engine.llm_engine import LLMEngine
from orcinus.request import RequestState
from orcinus.sampling_params import SamplingParams
from orcinus.tokenizer import StreamDetokenizer, Tokenizer

TEXTS = [
    " Hello, world! The quick brown fox jumps over the lazy dog.",
    " naïve café, crème brûlée 你好世界，今天天气很好。日本語のテキスト",
    " emoji: 🦀🚀 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽 end",
    " def f(x):\n    return x ** 2  # ✓ → ∞ 𝔘𝔫𝔦\n\ttabs  and   spaces",
]
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from orcinus.models.loader import default_model_path

    return Tokenizer.from_model_path(default_model_path())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok: Tokenizer) -> str:
    """A random Llama small enough to be quick, with SmolLM2's vocabulary and tokenizer files."""
    import transformers as tf
    from checkpoints import build_from_config

    path = str(tmp_path_factory.mktemp("smollm2-vocab"))
    cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    build_from_config(cfg, path)
    tok.hf.save_pretrained(path)
    return path


class ScriptedSampler:
    """The real sampler, whose choice is then replaced by the script of the row's prompt (rows of
    other prompts keep the model's choice). Counts how many tokens it sampled per prompt."""

    def __init__(self, real, scripts: dict[tuple[int, ...], list[int]]) -> None:
        self.real, self.scripts = real, scripts
        self.sampled: collections.Counter = collections.Counter()

    def __call__(self, logits: torch.Tensor, meta):
        out = self.real(logits, meta)
        for row, (prompt, done) in enumerate(zip(meta.prompt_token_ids, meta.output_token_ids)):
            script = self.scripts.get(tuple(prompt))
            if script is None:
                continue
            self.sampled[tuple(prompt)] += 1
            token = script[min(len(done), len(script) - 1)]
            out.token_ids[row] = token
            out.logprobs[row] = float(torch.log_softmax(logits[row].float(), -1)[token])
        return out


def make_engine(folder: str, **kwargs) -> LLMEngine:
    return LLMEngine.from_kwargs(model=folder, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
                                 block_size=4, **kwargs)


def script(engine: LLMEngine, scripts: dict[tuple[int, ...], list[int]]) -> ScriptedSampler:
    worker = engine.executor.driver_worker
    sampler = ScriptedSampler(worker.sampler, scripts)
    worker.sampler = sampler
    return sampler


def run(engine: LLMEngine) -> tuple[dict, dict]:
    """Step to the end; returns {request id: every output}, {request id: final output}."""
    seen: dict[str, list] = collections.defaultdict(list)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
            if out.finished:
                assert out.request_id not in final  # finished once
                final[out.request_id] = out
    return seen, final


def assert_streamed_consistently(outs: list, index: int = 0) -> str:
    """Each output's text extends the previous one (streamed text is never retracted)."""
    text = ""
    for out in outs:
        now = out.outputs[index].text
        assert now.startswith(text), (text, now)
        text = now
    return text


def test_the_engine_streams_in_rust(folder: str) -> None:
    engine = make_engine(folder)
    engine.add_request("r", "Hi", SamplingParams(max_tokens=2, **GREEDY))
    assert all(type(d) is StreamDetokenizer for d in engine.outputs.get("r").detokenizers)


@pytest.mark.parametrize("skip", [True, False])
def test_text_is_decode_of_the_output_ids(folder: str, tok: Tokenizer, skip: bool) -> None:
    engine = make_engine(folder)
    prompts = [tok.encode(f"Prompt {i}:") for i in range(len(TEXTS) + 2)]
    scripts = [tok.encode(t) for t in TEXTS]
    scripts.append(tok.encode(" special") + [1, 0] + tok.encode("user\nmore") + [3])  # special tokens inside
    scripts.append(tok.encode(" ends inside a rocket 🚀")[:-1])  # the last character never completes
    sampler = script(engine, {tuple(p): s for p, s in zip(prompts, scripts)})
    for i, (p, s) in enumerate(zip(prompts, scripts)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p},
                           SamplingParams(max_tokens=len(s), ignore_eos=True, skip_special_tokens=skip, **GREEDY))
    seen, final = run(engine)
    for i, s in enumerate(scripts):
        out = final[f"r{i}"].outputs[0]
        assert out.token_ids == s and out.finish_reason == "length"
        assert out.text == tok.decode(s, skip_special_tokens=skip)
        assert assert_streamed_consistently(seen[f"r{i}"]) == out.text
        # only the final output may hold a broken character: streamed text never shows half of one
        assert all("\ufffd" not in o.outputs[0].text for o in seen[f"r{i}"][:-1])
    assert final["r5"].outputs[0].text.endswith("\ufffd")  # flushed at the end, as decode renders it
    assert sum(sampler.sampled.values()) == sum(map(len, scripts))
    assert engine.free_all_check()


def test_n_samples_and_logprob_pieces(folder: str, tok: Tokenizer) -> None:
    engine = make_engine(folder)
    prompt = tok.encode("Tell me:")
    s = tok.encode(TEXTS[2])
    script(engine, {tuple(prompt): s})
    engine.add_request("g", {"prompt_token_ids": prompt},
                       SamplingParams(n=3, max_tokens=len(s), ignore_eos=True, logprobs=4, temperature=0.8, seed=1))
    seen, final = run(engine)
    outs = final["g"].outputs
    assert len(outs) == 3
    for i, out in enumerate(outs):
        assert out.token_ids == s and out.text == tok.decode(s) == assert_streamed_consistently(seen["g"], i)
        assert len(out.logprobs) == len(s)
        for token, entry in zip(s, out.logprobs):
            assert token in entry and 4 <= len(entry) <= 5
            for tid, lp in entry.items():
                assert lp.decoded == tok.decode([tid], skip_special_tokens=False)
    assert engine.free_all_check()


def _stop_case(tok: Tokenizer, text: str, stop: str) -> tuple[list[int], int, str]:
    """Script ids of `text`, the number of tokens up to the one that completes `stop`, and the
    text before the stop string (decode of the ids, cut where the stop string starts)."""
    ids = tok.encode(text)
    k = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    full = tok.decode(ids[:k])
    return ids, k, full[:full.index(stop)]


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_with_the_next_iteration_already_launched(folder: str, tok: Tokenizer, include: bool) -> None:
    """The token that completes a stop string is known as text only after the next iteration
    was launched with the request in it: the token computed there is discarded."""
    cases = {  # request id: (text the model says, stop string)
        "plain": (" The answer is 42. Then more words follow here.", " Then"),
        "split": (" so 🦀 crab and 你好世界 again", "好世"),  # stop inside a CJK run split across tokens
        "emoji": (" go 🚀🚀 now", "🚀"),
    }
    engine = make_engine(folder)
    prompts, expect = {}, {}
    for i, (rid, (text, stop)) in enumerate(cases.items()):
        ids, k, before = _stop_case(tok, text, stop)
        prompts[rid] = tok.encode(f"Case {i}:")
        expect[rid] = (ids, k, before + (stop if include else ""), stop)
    sampler = script(engine, {tuple(prompts[r]): expect[r][0] for r in cases})
    for rid in cases:
        engine.add_request(rid, {"prompt_token_ids": prompts[rid]},
                           SamplingParams(max_tokens=60, ignore_eos=True, stop=[expect[rid][3], "never seen"],
                                          include_stop_str_in_output=include, **GREEDY))
    generated = engine.generation_tokens_total
    seen, final = run(engine)
    for rid, (ids, k, text, stop) in expect.items():
        out = final[rid].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (text, "stop", stop)
        assert out.token_ids == ids[:k]  # usage: exactly the tokens emitted
        assert assert_streamed_consistently(seen[rid]) == text
        assert sampler.sampled[tuple(prompts[rid])] == k + 1  # one more was computed, and dropped
    assert engine.generation_tokens_total - generated == sum(k for _, k, _, _ in expect.values())
    assert engine.free_all_check() and not engine.scheduler.pool


def test_a_stop_string_on_the_last_allowed_token_is_a_stop(folder: str, tok: Tokenizer) -> None:
    ids, k, before = _stop_case(tok, " one two three four", " three")
    engine = make_engine(folder)
    prompt = tok.encode("Count:")
    script(engine, {tuple(prompt): ids})
    engine.add_request("r", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=k, ignore_eos=True, stop=" three", **GREEDY))
    _, final = run(engine)
    out = final["r"].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason, out.token_ids) == (before, "stop", " three", ids[:k])
    assert engine.free_all_check()


def test_stop_strings_under_preemption(folder: str, tok: Tokenizer) -> None:
    """Small KV pools: requests are preempted, some of them between the token that completes their
    stop string and its text (those are finished at once, not when a batch returns). Text, reason
    and token counts are exact either way, and every block comes back."""
    text = " alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
    # the last admitted (the first preempted) stops first, after an odd number of tokens: when, in
    # the smaller pools, it is preempted
    stops = [" mu", " kappa", " epsilon"]
    prompts, expect, scripts = {}, {}, {}
    for i, stop in enumerate(stops):
        ids, k, before = _stop_case(tok, text, stop)
        prompts[f"r{i}"] = tok.encode(f"Request number {i} says:")
        scripts[tuple(prompts[f"r{i}"])] = ids
        expect[f"r{i}"] = (ids[:k], before, stop)
    states = []
    preemptions = 0
    for blocks in range(13, 30):
        engine = LLMEngine.from_kwargs(model=folder, dtype="float32", device="cpu", block_size=2,
                                       kv_cache_memory=_pool_bytes(folder, blocks=blocks, block_size=2))
        assert engine.kv_cache.num_blocks == blocks
        original = engine._finish_stopped
        engine._finish_stopped = lambda req, original=original: (states.append(req.state), original(req))[1]
        script(engine, scripts)
        for rid, p in prompts.items():
            engine.add_request(rid, {"prompt_token_ids": p},
                               SamplingParams(max_tokens=20, ignore_eos=True, stop=expect[rid][2], **GREEDY))
        _, final = run(engine)
        for rid, (ids, before, stop) in expect.items():
            out = final[rid].outputs[0]
            assert (out.text, out.finish_reason, out.stop_reason, out.token_ids) == (before, "stop", stop, ids)
        preemptions += engine.scheduler.num_preemptions
        assert engine.free_all_check() and not engine.scheduler.pool
        engine.shutdown()
    assert preemptions > 0
    assert RequestState.RUNNING in states  # the usual case: finished when its batch returns
    assert RequestState.INITIATION in states  # preempted when its text reached the stop string


def _pool_bytes(folder: str, blocks: int, block_size: int) -> int:
    """kv_cache_memory for `blocks` blocks of the test model (float32 keys and values, one layer)."""
    import json
    import os

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_block = 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * 4
    return blocks * per_block


def test_abort_mid_stream_discards_the_token_in_flight(folder: str, tok: Tokenizer) -> None:
    engine = make_engine(folder)
    prompts = {rid: tok.encode(f"Stream {rid}:") for rid in ("keep", "drop")}
    s = tok.encode(TEXTS[1])
    script(engine, {tuple(p): s for p in prompts.values()})
    for rid, p in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": p}, SamplingParams(max_tokens=len(s), ignore_eos=True, **GREEDY))
    last = {}
    for _ in range(4):
        for out in engine.step():
            last[out.request_id] = out
    dropped = engine.scheduler.pool["drop"]
    assert dropped.state == RequestState.RUNNING  # the next iteration already holds it
    emitted = list(last["drop"].outputs[0].token_ids)
    engine.abort_request("drop")
    seen, final = run(engine)
    assert "drop" not in seen  # nothing more for it: the token computed in flight went nowhere
    assert dropped.output_token_ids == emitted and dropped.finish_reason.value == "abort"
    assert final["keep"].outputs[0].text == tok.decode(s)
    assert engine.free_all_check() and not engine.outputs.has("drop")
    engine.add_request("drop", {"prompt_token_ids": prompts["drop"]}, SamplingParams(max_tokens=3, **GREEDY))
    assert run(engine)[1]["drop"].outputs[0].token_ids == s[:3]  # the id is free again


def test_iterations_run_on_the_forward_thread_while_text_is_made(folder: str, tok: Tokenizer) -> None:
    """Causality, not timing: when the engine thread starts the text work of iteration i, the
    forward of iteration i+1 has already been handed to the forward thread."""
    import threading

    engine = make_engine(folder)
    prompt = tok.encode("Go:")
    s = tok.encode(TEXTS[0])
    script(engine, {tuple(prompt): s})
    runner = engine.executor.driver_worker.runner
    forwards: list[str] = []
    original_forward = runner.forward_logits

    def forward(*args, **kwargs):
        forwards.append(threading.current_thread().name)
        return original_forward(*args, **kwargs)

    runner.forward_logits = forward
    launched_before_text = []
    original_text = engine.outputs.process_text

    def process_text(requests):
        launched_before_text.append(len(engine._in_flight))
        return original_text(requests)

    engine.outputs.process_text = process_text
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=len(s), ignore_eos=True, **GREEDY))
    _, final = run(engine)
    assert final["r"].outputs[0].text == tok.decode(s)
    assert forwards and all(name.startswith("orcinus-forward") for name in forwards)
    # every iteration but the last had its successor in flight when its text was made
    assert launched_before_text == [1] * (len(s) - 1) + [0]


def test_streams_through_the_async_engine(folder: str, tok: Tokenizer) -> None:
    """The server's path: outputs handed to an asyncio stream by the engine thread. Streamed text
    is decode's, a stop string ends it exactly, and the stream's token count is what was emitted."""
    import asyncio

    from orcinus.engine.async_engine import AsyncEngine

    engine = make_engine(folder)
    prompts = {"plain": tok.encode("Plain:"), "stop": tok.encode("Stop:")}
    ids, k, before = _stop_case(tok, TEXTS[1], "你好")
    scripts = {tuple(prompts["plain"]): tok.encode(TEXTS[2]), tuple(prompts["stop"]): ids}
    sampler = script(engine, scripts)

    async def consume(ae: AsyncEngine, rid: str, params: SamplingParams) -> list:
        return [o async for o in ae.generate(rid, {"prompt_token_ids": prompts[rid]}, params)]

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        plain, stopped = await asyncio.gather(
            consume(ae, "plain", SamplingParams(max_tokens=len(scripts[tuple(prompts["plain"])]), ignore_eos=True,
                                                **GREEDY)),
            consume(ae, "stop", SamplingParams(max_tokens=100, ignore_eos=True, stop="你好", **GREEDY)))
        free = await ae.call(lambda e: e.free_all_check())
        await ae.shutdown()
        return plain, stopped, free

    plain, stopped, free = asyncio.run(asyncio.wait_for(main(), 120))
    assert plain[-1].finished and assert_streamed_consistently(plain) == tok.decode(scripts[tuple(prompts["plain"])])
    last = stopped[-1].outputs[0]
    assert stopped[-1].finished and not any(o.finished for o in stopped[:-1])
    assert (last.text, last.finish_reason, last.stop_reason, last.token_ids) == (before, "stop", "你好", ids[:k])
    assert assert_streamed_consistently(stopped) == before
    assert sampler.sampled[tuple(prompts["stop"])] == k + 1 and free
