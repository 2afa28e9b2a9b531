"""POST /tokenize and /detokenize in vLLM's shapes (a prompt or chat messages -> ids; ids -> text).
Tokenizer work runs on the prompt-preparation threads, like a generation request's."""
from __future__ import annotations

from orcinus.server.errors import OpenAIError
from orcinus.server.protocol_structured import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                                TokenizeResponse)
from orcinus.server.serving import ServingContext


def _tokenizer(ctx: ServingContext, model: str | None):
    if model and model not in ctx.settings.served_model_names:
        raise OpenAIError(404, f"the model {model!r} does not exist here", param="model", code="model_not_found")
    tok = ctx.engine.tokenizer
    if tok is None:
        raise OpenAIError(400, "this server runs without a tokenizer (skip_tokenizer_init)")
    return tok


async def tokenize(ctx: ServingContext, body: TokenizeRequest) -> TokenizeResponse:
    tok = _tokenizer(ctx, body.model)
    if body.prompt is not None:
        ctx.check_text_length(len(body.prompt), "prompt")

    def work() -> TokenizeResponse:
        if body.messages is not None:
            messages = [{"role": m.get("role"), "content": m.get("content") or ""} for m in body.messages]
            ids = tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids,
                                token_strs=strs)

    return await ctx.engine.prepare(work)


async def detokenize(ctx: ServingContext, body: DetokenizeRequest) -> DetokenizeResponse:
    tok = _tokenizer(ctx, body.model)
    vocab = ctx.engine.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise OpenAIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=await ctx.engine.prepare(lambda: tok.decode(body.tokens)))
