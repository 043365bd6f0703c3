"""The generation routes, POST /v1/chat/completions and /v1/completions: a validated body becomes
engine requests (serving.ServingContext.begin), whose outputs are answered whole or streamed.

Chat and completions each have a whole response and a chunk stream; choices are numbered prompt by
prompt, then α by α, then the n samples of each (serving.Served.choice_index). With `echo` and
`logprobs`, a completion choice starts with its prompt and the prompt tokens' logprobs (the first
is null): with `max_tokens: 0` that scores a text without generating, and with `max_tokens: 1` it
is what lm-evaluation-harness's loglikelihood requests send.

Logprobs come in OpenAI's two shapes, chat's `content` list and completions' parallel lists. A
token is shown as the text it decodes to on its own (special tokens included). A logprob of -inf
(a token the sampler could never pick) is shown as -9999.0, as OpenAI does: JSON has no infinity.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.request import CompletionOutput, RequestOutput, TokenLogprob
from .errors import invalid
from .protocol import (DOCUMENTED_ERRORS, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
                       CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage, GenerationRequest,
                       TopLogprob)
from .serving import Served, ServingContext, event_stream, json_response, serving

_STREAM = {"content": {"text/event-stream": {}}, "description": "The response, or with `stream: true` its chunks"}
router = APIRouter()


# -- the routes ------------------------------------------------------------------------------------

def _check_supported(ctx: ServingContext, body: GenerationRequest) -> None:
    """What both generation routes refuse before any work."""
    ctx.check_model(body.model)
    if body.stream_options is not None and not body.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if body.logit_bias:
        raise invalid("'logit_bias' is not supported by this server.", param="logit_bias",
                      code="unsupported_parameter")


def _include_usage(body: GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**DOCUMENTED_ERRORS, 200: _STREAM})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Messages through the chat template, answered whole or streamed."""
    ctx = serving(request)
    _check_supported(ctx, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs' to be true.", param="top_logprobs")
    if body.tools:
        raise invalid("'tools' are not supported by this server.", param="tools", code="unsupported_parameter")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise invalid("Only the 'text' response format is supported.", param="response_format",
                      code="unsupported_parameter")
    # max_completion_tokens is the newer name; with neither, the server's default applies.
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = body.sampling_params(max_tokens=max_tokens, default_max_tokens=ctx.max_tokens_default,
                                  logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    prompt = await ctx.chat_prompt(body.messages)
    served = await ctx.begin(request, body, [prompt], params, "chatcmpl")
    if body.stream:
        return event_stream(chat_chunks(served, body.logprobs, _include_usage(body)), served.finish, served.headers,
                            ctx.stream_grace_s)
    return json_response(chat_response(served, await served.collect(request), body.logprobs), served.headers)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**DOCUMENTED_ERRORS, 200: _STREAM})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Prompts as text or token ids (one or a list), with echo and logprobs."""
    ctx = serving(request)
    _check_supported(ctx, body)
    if body.suffix:
        raise invalid("'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("'best_of' must equal 'n' on this server.", param="best_of", code="unsupported_parameter")
    params = body.sampling_params(max_tokens=body.max_tokens, default_max_tokens=ctx.max_tokens_default,
                                  logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)
    served = await ctx.begin(request, body, body.prompts(), params, "cmpl")
    shape = CompletionShape(served, body.echo, body.logprobs is not None, body.skip_special_tokens)
    if body.stream:
        return event_stream(shape.chunks(_include_usage(body)), served.finish, served.headers, ctx.stream_grace_s)
    return json_response(shape.response(await served.collect(request)), served.headers)


# -- logprobs ---------------------------------------------------------------------------------------

FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob >= FLOOR else FLOOR  # also maps NaN (never >=) to the floor


def chat_logprobs(entries: list[TokenLogprob], text: Callable[[int], str]) -> list[ChatTokenLogprob]:
    content = []
    for entry in entries:
        token = text(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            alt = text(token_id)
            top.append(TopLogprob(token=alt, logprob=_finite(logprob), bytes=list(alt.encode())))
        content.append(ChatTokenLogprob(token=token, logprob=_finite(entry.logprob), bytes=list(token.encode()),
                                        top_logprobs=top))
    return content


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], text: Callable[[int], str],
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The lists for `token_ids` (an entry is None for a prompt's first token, which has no
    logprob), with text offsets counted from `offset`; returns them and the offset after them."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = text(token_id)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_finite(entry.logprob))
        # The chosen token is always listed, so that a client can tell whether it was the
        # most likely one (lm-evaluation-harness's is_greedy compares it with the best value).
        top = {token: _finite(entry.logprob)}
        for alt_id, logprob in entry.top:
            alt = text(alt_id)
            top[alt] = max(top.get(alt, FLOOR), _finite(logprob))
        result.top_logprobs.append(top)
    return result, offset


# -- chat ------------------------------------------------------------------------------------------

def chat_response(served: Served, finals: list[RequestOutput], logprobs: bool) -> ChatCompletionResponse:
    text = served.ctx.token_text
    choices = [
        ChatChoice(index=served.choice_index(job, out.index), message=AssistantMessage(content=out.text),
                   logprobs=ChatLogprobs(content=chat_logprobs(out.logprobs, text)) if logprobs else None,
                   finish_reason=out.finish_reason, stop_reason=out.stop_reason, alpha=served.choices[job].alpha)
        for job, final in enumerate(finals) for out in final.outputs
    ]
    return ChatCompletionResponse(id=served.request_id, created=served.created, model=served.ctx.model_name,
                                  choices=choices, usage=served.usage(finals), expo=served.expo)


async def chat_chunks(served: Served, logprobs: bool, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    text = served.ctx.token_text

    def chunk(choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=served.request_id, created=served.created, model=served.ctx.model_name,
                                   choices=choices, **extra)

    # First: every choice's role, with the `expo` object that says which α serves it.
    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""), alpha=served.alpha_of(i))
                 for i in range(served.num_choices)], expo=served.expo)
    text_sent: dict[int, int] = {}
    tokens_sent: dict[int, int] = {}
    async for index, alpha, _, out in choice_updates(served):
        new_text = out.text[text_sent.get(index, 0):]
        new_logprobs = out.logprobs[tokens_sent.get(index, 0):] if logprobs and out.logprobs else []
        if new_text or new_logprobs:
            text_sent[index] = len(out.text)
            tokens_sent[index] = tokens_sent.get(index, 0) + len(new_logprobs)
            yield chunk([ChatChunkChoice(
                index=index, delta=DeltaMessage(content=new_text), alpha=alpha,
                logprobs=ChatLogprobs(content=chat_logprobs(new_logprobs, text)) if new_logprobs else None)])
        if out.finished:
            yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=out.finish_reason,
                                         stop_reason=out.stop_reason, alpha=alpha)])
    if include_usage:
        yield chunk([], usage=served.usage(served.group.latest))


# -- completions -----------------------------------------------------------------------------------

class CompletionShape:
    """Engine outputs -> completion choices, whole or as stream chunks (with the echoed prompt)."""

    def __init__(self, served: Served, echo: bool, logprobs: bool, skip_special_tokens: bool):
        self.served = served
        self.echo = echo
        self.logprobs = logprobs
        self.skip_special_tokens = skip_special_tokens
        self.text = served.ctx.token_text

    def prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.served.ctx.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=self.skip_special_tokens)

    def prompt_logprobs(self, output: RequestOutput) -> CompletionLogprobs:
        return completion_logprobs(output.prompt_token_ids, output.prompt_logprobs or [], self.text)[0]

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        served = self.served
        choices = [self._whole_choice(job, final, out) for job, final in enumerate(finals) for out in final.outputs]
        return CompletionResponse(id=served.request_id, created=served.created, model=served.ctx.model_name,
                                  choices=choices, usage=served.usage(finals), expo=served.expo)

    def _whole_choice(self, job: int, output: RequestOutput, out: CompletionOutput) -> CompletionChoice:
        prefix = self.prompt_text(output) if self.echo else ""
        logprobs = None
        if self.logprobs:
            logprobs = self.prompt_logprobs(output) if self.echo else CompletionLogprobs()
            generated, _ = completion_logprobs(out.token_ids, out.logprobs or [], self.text, len(prefix))
            _extend(logprobs, generated)
        return CompletionChoice(index=self.served.choice_index(job, out.index), text=prefix + out.text,
                                logprobs=logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                alpha=self.served.choices[job].alpha)

    async def chunks(self, include_usage: bool) -> AsyncIterator[CompletionResponse]:
        served = self.served
        text_sent: dict[int, int] = {}
        tokens_sent: dict[int, int] = {}
        offsets: dict[int, int] = {}
        expo_sent = False

        def chunk(choice: CompletionChoice) -> CompletionResponse:
            nonlocal expo_sent
            response = CompletionResponse(id=served.request_id, created=served.created, model=served.ctx.model_name,
                                          choices=[choice], expo=None if expo_sent else served.expo)
            expo_sent = True
            return response

        async for index, alpha, output, out in choice_updates(served):
            text, logprobs = "", None
            if index not in text_sent:  # this choice's first chunk: the echoed prompt
                text_sent[index], tokens_sent[index], offsets[index] = 0, 0, 0
                if self.echo:
                    text = self.prompt_text(output)
                    offsets[index] = len(text)
                    if self.logprobs:
                        logprobs = self.prompt_logprobs(output)
            text += out.text[text_sent[index]:]
            text_sent[index] = len(out.text)
            if self.logprobs and out.logprobs and len(out.logprobs) > tokens_sent[index]:
                first = tokens_sent[index]
                generated, offsets[index] = completion_logprobs(out.token_ids[first:], out.logprobs[first:],
                                                                self.text, offsets[index])
                tokens_sent[index] = len(out.logprobs)
                logprobs = _extend(logprobs or CompletionLogprobs(), generated)
            if text or logprobs:
                yield chunk(CompletionChoice(index=index, text=text, logprobs=logprobs, alpha=alpha))
            if out.finished:
                yield chunk(CompletionChoice(index=index, text="", finish_reason=out.finish_reason,
                                             stop_reason=out.stop_reason, alpha=alpha))
        if include_usage:
            yield CompletionResponse(id=served.request_id, created=served.created, model=served.ctx.model_name,
                                     choices=[], usage=served.usage(served.group.latest))


async def choice_updates(served: Served) -> AsyncIterator[tuple[int, float, RequestOutput, CompletionOutput]]:
    """Each choice's cumulative output as it arrives, until it has finished: (choice index, its α,
    the engine request's output, the choice's output)."""
    finished: set[int] = set()
    async for job, output in served.group.outputs():
        for out in output.outputs:
            index = served.choice_index(job, out.index)
            if index not in finished:
                if out.finished:
                    finished.add(index)
                yield index, served.choices[job].alpha, output, out


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> CompletionLogprobs:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
    return into
