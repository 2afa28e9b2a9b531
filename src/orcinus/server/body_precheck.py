"""Cheap checks of a generation request's raw body, before it is parsed.

Parsing and validating a JSON body is done on the event loop, where every other client's
responses are written too: an 8 MB body of four million token ids used to hold the loop for
seconds (a Python walk over every element looking for lone surrogates, then a Python check of
every id), and /health and every stream waited behind it. What can be decided from the bytes
is decided here, with single C-speed passes (bytes.count, bytes.replace, one regex search), so
that a body's cost on the loop is bounded by a few passes over it before anything else runs:

- Lone surrogates. JSON may spell one ("\\udc80") although UTF-8 cannot hold it; the tokenizer or
  the response encoder would fail on it later. Raw UTF-8 cannot contain one, so only a \\u escape
  can: after removing escaped backslashes, a high-surrogate escape not followed by a low one, or
  a low one not preceded by a high one, is exactly a lone surrogate.
- More token ids than the prompts could hold. Every comma of a body separates two array items
  or two object members, or sits inside a string. A prompt holds fewer than max_model_len ids
  and a string that can fit the context has at most max_prompt_chars characters, so a body with
  more commas than (arrays x max_model_len + strings x max_prompt_chars + members) cannot be a
  request that fits, whatever its layout: refused without parsing it.

Anything that passes is parsed and validated as usual; the exact checks (each prompt's length,
the request's total) still happen after parsing, they are just no longer reached by bodies that
are hopeless from their size alone.
"""
from __future__ import annotations

import re
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orcinus.server.errors import OpenAIError

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")

# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
# Bodies this small cannot cost the loop anything worth a check of their commas.
_SMALL_BODY = 64 * 1024


def lone_surrogate_at(body: bytes) -> int | None:
    """Byte offset of the first lone-surrogate escape in a JSON body, or None."""
    if b"\\u" not in body:
        return None
    # Escaped backslashes first ("\\\\udc80" is a backslash and the text "udc80", not an escape).
    # Removed left to right, as a JSON reader tokenises them; offsets shift, which only makes the
    # reported offset approximate.
    match = _LONE_SURROGATE.search(body.replace(b"\\\\", b""))
    return None if match is None else match.start()


def too_many_items(body: bytes, max_model_len: int, max_prompt_chars: int | None) -> int | None:
    """The body's comma count when it exceeds what any request that fits could hold, else None."""
    if len(body) <= _SMALL_BODY:
        return None
    commas = body.count(b",")
    strings = body.count(b'"') // 2 + 1
    per_string = max_prompt_chars if max_prompt_chars is not None else max_model_len * 64
    bound = (body.count(b"[") + 1) * max_model_len + strings * per_string + body.count(b":")
    return commas if commas > bound else None


class GenerationBodyPrecheck:
    """ASGI middleware: reads a generation request's body (already bounded in size and time by
    the middlewares outside it), refuses what the checks above catch with an OpenAI-style 400,
    and replays the body to the app otherwise. `limits()` gives (max_model_len, max_prompt_chars)."""

    def __init__(self, app: ASGIApp, limits: Callable[[], tuple[int, int | None]]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        error = self._check(body)
        if error is not None:
            from orcinus.server.middleware import send_error

            return await send_error(send, error)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only a disconnect can come

        await self.app(scope, replay, send)

    def _check(self, body: bytes) -> OpenAIError | None:
        at = lone_surrogate_at(body)
        if at is not None:
            return OpenAIError(400, f"text must be valid Unicode; the body holds a lone surrogate escape (e.g. "
                                    f"\\udc80) near byte {at}")
        max_model_len, max_prompt_chars = self.limits()
        commas = too_many_items(body, max_model_len, max_prompt_chars)
        if commas is not None:
            return OpenAIError(400, f"the request holds about {commas} items (token ids or text), more than its "
                                    f"prompts can fit in the model's context of {max_model_len} tokens; shorten "
                                    "the prompts", param="prompt", code="context_length_exceeded")
        return None
