"""One streamed request to an OpenAI-compatible `/v1/completions` endpoint, timed on the client.

Prompts go out as the completions API allows: a string (ShareGPT's real text) or a list of token
ids (the synthetic traces, so the server sees exactly the drawn prompt length whatever its
tokenizer does with the text). EOS is ignored through vLLM's `ignore_eos` extra so every request
generates exactly `max_tokens` tokens; servers that reject unknown fields can turn it off.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from orcinus.bench.metrics import RequestResult
from orcinus.bench.workloads import BenchRequest


@dataclass
class EndpointConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1/... paths are appended)
    model: str
    ignore_eos: bool = True
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 6 * 3600.0  # a slow CPU run may legitimately take very long

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def request_body(req: BenchRequest, ep: EndpointConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": ep.model,
        "prompt": req.prompt_text if req.prompt_text is not None else req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ep.ignore_eos:
        body["ignore_eos"] = True
    body.update(ep.extra_body)
    return body


async def send_request(client: httpx.AsyncClient, req: BenchRequest, ep: EndpointConfig) -> RequestResult:
    """Sends one request and times every streamed chunk; never raises for a server-side failure."""
    result = RequestResult(prompt_len=req.prompt_len, expected_output_len=req.output_len)
    text_parts: list[str] = []
    usage_tokens: int | None = None
    start = time.perf_counter()
    result.send_time = start
    last = start
    try:
        async with client.stream("POST", ep.completions_url, json=request_body(req, ep),
                                 headers=ep.headers(), timeout=ep.timeout_s) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(payload)
                if data.get("error"):
                    result.error = f"stream error: {json.dumps(data['error'])[:500]}"
                    return result
                choices = data.get("choices") or []
                if choices:
                    # Every chunk with a choice carries newly generated tokens (its text may be
                    # empty while a multi-byte character is incomplete): time it either way.
                    if result.num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.num_chunks += 1
                    text_parts.append(choices[0].get("text") or "")
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.num_chunks == 0:
        result.error = "the stream ended without a single token"
        return result
    result.latency = last - start
    result.generated_text = "".join(text_parts)
    # Without usage, one chunk per token is the best guess (true of vLLM, SGLang and orcinus).
    result.output_len = usage_tokens if usage_tokens is not None else result.num_chunks
    result.success = True
    return result


async def discover_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None) -> str:
    """The first model id the server lists at /v1/models."""
    resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers or {}, timeout=30.0)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --served-model-name")
    return str(models[0]["id"])
