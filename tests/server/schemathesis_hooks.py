"""Schemathesis hooks for the fuzzing test: keep each generated request cheap to serve.

The schema accepts n up to 128 and max_tokens up to the context length, and all of that is
legitimate; but on a CPU, fuzzing hundreds of such requests would take hours. Values inside the
accepted range are scaled down just before each request is sent; values outside it (which the
server must refuse) are left alone.
"""
from __future__ import annotations

import schemathesis

MAX_N = 2
MAX_NEW_TOKENS = 1
_CLAMPED = {"n": MAX_N, "best_of": MAX_N, "max_tokens": MAX_NEW_TOKENS, "max_completion_tokens": MAX_NEW_TOKENS,
            "min_tokens": MAX_NEW_TOKENS}


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    # /tokenize and /detokenize: a generated model name is almost never the served one, so nearly
    # every case ended at the 404 before the tokenizer (schemathesis then warns that the operation
    # is never reached); the name check itself is exercised by the other endpoints' cases.
    if case.operation.path in ("/tokenize", "/detokenize") and isinstance(body.get("model"), str):
        del body["model"]
    # Without max_tokens a request would generate up to the server's default; be explicit.
    if "max_tokens" not in body and "max_completion_tokens" not in body and ("prompt" in body or "messages" in body):
        body["max_tokens"] = MAX_NEW_TOKENS
    for key, cap in _CLAMPED.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and cap < value <= 1024:
            body[key] = cap
