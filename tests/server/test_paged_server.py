"""`orcinus serve --scheduler-policy paged` with a KV pool far smaller than 32 chats need: 32
concurrent chats without max_tokens (each may run to the context length) all complete, requests
are preempted and recomputed along the way, and the pool is empty again afterwards."""
from __future__ import annotations

import asyncio

import httpx
import openai

from server_helpers import log_tail, metric, start_server, stop_server, wait_until

NUM_CHATS = 32
MAX_MODEL_LEN = 96
# SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 4 bytes = 46,080 bytes per token.
# 1,024 slots: Orca's reservation (96 per chat) would run 10 chats at once; they need 3,072 together.
KV_BYTES = 1024 * 46_080


def test_32_chats_without_max_tokens_complete_on_a_small_pool(tmp_path):
    log = tmp_path / "paged.log"
    srv = start_server(log, "--scheduler-policy", "paged", "--max-model-len", str(MAX_MODEL_LEN),
                       "--kv-cache-memory", str(KV_BYTES), "--max-num-seqs", str(NUM_CHATS),
                       "--max-num-batched-tokens", "512")
    try:
        assert "policy=paged" in log.read_text() and "prefix_caching=on" in log.read_text()

        async def chat(client: openai.AsyncOpenAI, i: int) -> tuple[str | None, int]:
            resp = await client.chat.completions.create(
                model=httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["id"],
                messages=[{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": f"Tell me a story about the number {i}."}],
                temperature=0, extra_body={"ignore_eos": True})
            return resp.choices[0].finish_reason, resp.usage.prompt_tokens + resp.usage.completion_tokens

        async def run_all():
            async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                                          timeout=600) as client:
                return await asyncio.gather(*(chat(client, i) for i in range(NUM_CHATS)))

        results = asyncio.run(run_all())
        assert len(results) == NUM_CHATS
        for reason, total in results:
            assert reason == "length" and total == MAX_MODEL_LEN  # ran to the context length
        text = httpx.get(srv.base_url + "/metrics", timeout=10).text
        assert metric(text, "orcinus:num_preemptions_total") > 0
        assert metric(text, "orcinus:prefix_cache_hits_total") > 0  # the shared system prompt
        assert metric(text, "orcinus:prefix_cache_queries_total") >= metric(text, "orcinus:prefix_cache_hits_total")

        def idle() -> bool:
            t = httpx.get(srv.base_url + "/metrics", timeout=10).text
            return (metric(t, "orcinus:num_requests_running") == 0 and metric(t, "orcinus:kv_cache_usage_perc") == 0
                    and metric(t, "orcinus:kv_cache_allocated_slots") == 0)

        assert wait_until(idle, 15)
    finally:
        rc = stop_server(srv)
    assert rc == 0, log_tail(log)
