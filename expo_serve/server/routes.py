"""The HTTP routes: thin, each hands its validated body to the module that serves it."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from . import chat, completions, tokenize
from .admission import RETRY_AFTER_S
from .protocol import (AlphaRange, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, Health, ModelCard,
                       ModelList, TokenizeRequest, TokenizeResponse)
from .serving import ServingContext, json_response

_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model or experiment"),
    (413, "Request body too large"), (503, "Queue full (see Retry-After) or shutting down"))}
_STREAM = {"content": {"text/event-stream": {}}, "description": "The response, or with `stream: true` its chunks"}

router = APIRouter()
STARTED = int(time.time())


def serving(request: Request) -> ServingContext:
    return request.app.state.serving


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, 200: _STREAM})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await chat.create_chat_completion(serving(request), body, request)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, 200: _STREAM})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await completions.create_completion(serving(request), body, request)


def model_card(ctx: ServingContext) -> ModelCard:
    policy = ctx.policy
    return ModelCard(id=ctx.model_name, created=STARTED, max_model_len=ctx.max_model_len,
                     alpha=AlphaRange(default=policy.default, min=policy.minimum, max=policy.maximum))


@router.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(serving(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={401: _ERRORS[401], 404: _ERRORS[404]})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """The openai client's models.retrieve: the served model's card, 404 for any other id."""
    ctx = serving(request)
    ctx.check_model(model_id)
    return model_card(ctx)


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Shutting down"}})
async def health(request: Request) -> Response:
    if serving(request).gate.closed:  # draining: a balancer sends new requests elsewhere
        return json_response(Health(status="draining"), status_code=503,
                             headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
    return json_response(Health(status="ok"))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=TokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
async def tokenize_text(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await tokenize.tokenize(serving(request), body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses={400: _ERRORS[400], 404: _ERRORS[404]})
async def detokenize_tokens(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await tokenize.detokenize(serving(request), body)
