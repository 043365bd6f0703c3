"""The HTTP routes other than generation (generation.py): the model card, health, metrics, and
tokenization. The app includes both routers.

/tokenize and /detokenize use the server's own tokenization: text is encoded without added special
tokens, as completions prompts are; messages go through the chat template, as chat requests do.
So a tokenize `count` is the request's `usage.prompt_tokens`.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .errors import RETRY_AFTER_S, invalid
from .protocol import (DOCUMENTED_ERRORS, AlphaBounds, DetokenizeRequest, DetokenizeResponse, Health, ModelCard,
                       ModelList, TokenizeRequest, TokenizeResponse)
from .serving import ServingContext, json_response, serving

_ERRORS = DOCUMENTED_ERRORS
router = APIRouter()
STARTED = int(time.time())



def model_card(ctx: ServingContext) -> ModelCard:
    bounds = ctx.engine.alpha_range
    return ModelCard(id=ctx.model_name, created=STARTED, max_model_len=ctx.engine.max_model_len,
                     alpha=AlphaBounds(default=bounds.default, min=bounds.min, max=bounds.max))


@router.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(serving(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={401: _ERRORS[401], 404: _ERRORS[404]})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """The openai client's models.retrieve: the served model's card, 404 for any other id."""
    ctx = serving(request)
    ctx.check_model(model_id)
    return model_card(ctx)


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Shutting down, or failed"}})
async def health(request: Request) -> Response:
    ctx = serving(request)
    if ctx.engine.failure is not None:  # a tensor-parallel rank died: the server is about to exit non-zero
        return json_response(Health(status="failed"), status_code=503, headers={"Connection": "close"})
    if ctx.gate.closed:  # draining: a balancer sends new requests elsewhere
        return json_response(Health(status="draining"), status_code=503,
                             headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
    return json_response(Health(status="ok"))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=TokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = serving(request)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("Give exactly one of 'prompt' or 'messages'.", param="prompt")
    if body.messages is not None:
        ids = await ctx.chat_prompt(body.messages, body.add_generation_prompt)
    else:
        ids = await run_in_threadpool(lambda: list(ctx.tokenizer.encode(body.prompt, add_special_tokens=False)))
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.engine.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = serving(request)
    ctx.check_model(body.model)
    vocab_size = ctx.engine.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"Token id {bad} is outside the vocabulary (0 to {vocab_size - 1}).", param="tokens")
    text = await run_in_threadpool(ctx.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
