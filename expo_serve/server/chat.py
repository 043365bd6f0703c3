"""POST /v1/chat/completions: messages through the chat template, answers whole or streamed."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .errors import invalid
from .logprobs import chat_logprobs
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, DeltaMessage)
from .sampling import sampling_params
from .serving import Served, ServingContext, json_response
from .streaming import event_stream
from .templates import render_chat


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, http: Request) -> Response:
    ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs' to be true.", param="top_logprobs")
    if body.tools:
        raise invalid("'tools' are not supported by this server.", param="tools", code="unsupported_parameter")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise invalid("Only the 'text' response format is supported.", param="response_format",
                      code="unsupported_parameter")
    # max_completion_tokens is the newer name; with neither, the server's default applies.
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(body, max_tokens=max_tokens, default_max_tokens=ctx.max_tokens_default,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    prompt = await run_in_threadpool(render_chat, ctx.tokenizer, body.messages)
    served = await ctx.begin(http, body, [prompt], params, "chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_chunks(ctx, served, body.logprobs, include_usage), served.finish, served.headers,
                            ctx.stream_grace_s)
    finals = await served.collect(http)
    choices = [
        ChatChoice(index=served.choice_index(job, out.index), message=AssistantMessage(content=out.text),
                   logprobs=ChatLogprobs(content=chat_logprobs(out.logprobs, ctx.token_text)) if body.logprobs else None,
                   finish_reason=out.finish_reason, stop_reason=out.stop_reason, alpha=job.choice.alpha)
        for job in served.generation.jobs for out in job.latest.outputs
    ]
    response = ChatCompletionResponse(id=served.request_id, created=served.created, model=ctx.model_name,
                                      choices=choices, usage=served.usage(finals), expo=served.expo)
    return json_response(response, served.headers)


async def _chunks(ctx: ServingContext, served: Served, logprobs: bool,
                  include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=served.request_id, created=served.created, model=ctx.model_name,
                                   choices=[choice])

    # First: every choice's role, with the `expo` object that says which α serves it.
    roles = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""), alpha=served.alpha_of(i))
             for i in range(served.num_choices)]
    yield ChatCompletionChunk(id=served.request_id, created=served.created, model=ctx.model_name, choices=roles,
                              expo=served.expo)
    text_sent: dict[int, int] = {}
    tokens_sent: dict[int, int] = {}
    finished: set[int] = set()
    async for job, output in served.generation.outputs():
        for out in output.outputs:
            index = served.choice_index(job, out.index)
            if index in finished:
                continue
            text = out.text[text_sent.get(index, 0):]
            new_logprobs = out.logprobs[tokens_sent.get(index, 0):] if logprobs and out.logprobs else []
            if text or new_logprobs:
                text_sent[index] = len(out.text)
                tokens_sent[index] = tokens_sent.get(index, 0) + len(new_logprobs)
                yield chunk(ChatChunkChoice(
                    index=index, delta=DeltaMessage(content=text), alpha=job.choice.alpha,
                    logprobs=ChatLogprobs(content=chat_logprobs(new_logprobs, ctx.token_text)) if new_logprobs else None))
            if out.finished:
                finished.add(index)
                yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=out.finish_reason,
                                            stop_reason=out.stop_reason, alpha=job.choice.alpha))
    if include_usage:
        yield ChatCompletionChunk(id=served.request_id, created=served.created, model=ctx.model_name, choices=[],
                                  usage=served.usage([job.latest for job in served.generation.jobs]))
