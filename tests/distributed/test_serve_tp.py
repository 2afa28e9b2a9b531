"""`orcinus serve --tensor-parallel-size 2` answers chat through the openai client with the same
greedy reply as one process, stops gracefully, and leaves no worker process behind."""
from __future__ import annotations

import os
import time

import openai
import pytest
import torch

from orcinus.bench.server_process import ServerProcess
from orcinus.engine.llm import LLM
from orcinus.models.loader import default_model_path
from orcinus.sampling_params import SamplingParams

def _children(pid: int) -> list[int]:
    """Live child processes of pid (from /proc: ppid is the 4th field of /proc/<pid>/stat)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    """A tiny random Llama over the default model's vocabulary, so its tokenizer and chat
    template (read from the default GGUF with --tokenizer) apply."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    folder = str(tmp_path_factory.mktemp("tiny-chat"))
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def test_serve_with_tensor_parallel_answers_chat(tiny_chat_model, tmp_path):
    tokenizer = default_model_path()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = LLM(tiny_chat_model, tokenizer=tokenizer, kv_cache_memory=1 << 24).chat(MESSAGES, params)
    srv = ServerProcess(engine_args=["--model", tiny_chat_model, "--tokenizer", tokenizer, "--kv-cache-memory",
                                     str(1 << 24), "--tensor-parallel-size", "2"],
                        log_path=str(tmp_path / "serve.log"), startup_timeout_s=240)
    with srv:
        workers = _children(srv.proc.pid)
        assert len(workers) >= 2  # the two tensor-parallel ranks (and multiprocessing's helper)
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.0)
        srv.stop(timeout_s=60)
        assert srv.proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert reply.choices[0].message.content == expected[0].outputs[0].text
    assert reply.usage.completion_tokens == len(expected[0].outputs[0].token_ids)
    # Orphaned workers would stay for ever; exiting ones may take a moment after the server is gone.
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
