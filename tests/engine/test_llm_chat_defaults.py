"""`LLM.chat()` without sampling parameters uses the server's chat defaults (README, issue 19):
the model's max_new_tokens, at most 512, within the context; it used to stop at OpenAI's 16."""
from __future__ import annotations

import pytest
import torch

from orcinus.engine.llm import DEFAULT_CHAT_MAX_TOKENS, LLM
from orcinus.models.loader import default_model_path

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    """A tiny random Llama over the default model's vocabulary (its tokenizer and chat template
    come from the default GGUF through tokenizer=)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    folder = str(tmp_path_factory.mktemp("tiny-chat"))
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def test_chat_without_parameters_is_not_cut_at_16_tokens(tiny_chat_model: str) -> None:
    llm = LLM(model=tiny_chat_model, tokenizer=default_model_path(), dtype="float32", generation_config="vllm")
    out = llm.chat(MESSAGES)[0]
    generated = len(out.outputs[0].token_ids)
    # Random weights rarely sample the end token: the reply runs to what the context leaves.
    room = 256 - len(out.prompt_token_ids)
    assert out.outputs[0].finish_reason == "length" or generated > 16
    assert generated == min(room, DEFAULT_CHAT_MAX_TOKENS) or out.outputs[0].finish_reason == "stop"
    assert generated > 16 or out.outputs[0].finish_reason == "stop"
    # With the model's own bound, that bound applies; explicit parameters are untouched.
    llm2 = LLM(model=tiny_chat_model, tokenizer=default_model_path(), dtype="float32", generation_config="vllm",
               override_generation_config={"max_new_tokens": 40})
    assert len(llm2.chat(MESSAGES)[0].outputs[0].token_ids) <= 40
    assert len(llm2.generate("Once upon a time")[0].outputs[0].token_ids) <= 40
