"""POST /tokenize and /detokenize (vLLM's shapes), with the tokenization the server itself uses.

Text is encoded without added special tokens, as completions prompts are; messages go through
the chat template, as chat requests do. So `count` is the request's `usage.prompt_tokens`.
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from .errors import invalid
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving import ServingContext
from .templates import render_chat


async def tokenize(ctx: ServingContext, body: TokenizeRequest) -> TokenizeResponse:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("Give exactly one of 'prompt' or 'messages'.", param="prompt")
    if body.messages is not None:
        ids = await run_in_threadpool(render_chat, ctx.tokenizer, body.messages, body.add_generation_prompt)
    else:
        ids = await run_in_threadpool(lambda: list(ctx.tokenizer.encode(body.prompt, add_special_tokens=False)))
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len)


async def detokenize(ctx: ServingContext, body: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < ctx.vocab_size), None)
    if bad is not None:
        raise invalid(f"Token id {bad} is outside the vocabulary (0 to {ctx.vocab_size - 1}).", param="tokens")
    text = await run_in_threadpool(ctx.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
