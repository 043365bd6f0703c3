"""POST /v1/completions: prompts as text or token ids (one or a list), echo and logprobs.

With `echo` and `logprobs`, a choice starts with its prompt and the prompt tokens' logprobs (the
first is null): with `max_tokens: 0` that scores a text without generating, and with
`max_tokens: 1` it is what lm-evaluation-harness's loglikelihood requests send.
"""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from ..engine.request import CompletionOutput, RequestOutput
from .errors import invalid
from .generation import Job
from .logprobs import completion_logprobs
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .sampling import sampling_params
from .serving import Served, ServingContext, json_response
from .streaming import event_stream


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """One prompt or a batch of them: text, token ids, a list of texts, or a list of token-id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


async def create_completion(ctx: ServingContext, body: CompletionRequest, http: Request) -> Response:
    ctx.check_model(body.model)
    if body.suffix:
        raise invalid("'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("'best_of' must equal 'n' on this server.", param="best_of", code="unsupported_parameter")
    echo_logprobs = body.logprobs if body.echo else None
    params = sampling_params(body, max_tokens=body.max_tokens, default_max_tokens=ctx.max_tokens_default,
                             logprobs=body.logprobs, prompt_logprobs=echo_logprobs)
    served = await ctx.begin(http, body, prompt_list(body.prompt), params, "cmpl")
    shape = _Shape(ctx, body, served)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(shape.chunks(include_usage), served.finish, served.headers, ctx.stream_grace_s)
    finals = await served.collect(http)
    choices = [shape.whole_choice(job, out) for job in served.generation.jobs for out in job.latest.outputs]
    response = CompletionResponse(id=served.request_id, created=served.created, model=ctx.model_name,
                                  choices=choices, usage=served.usage(finals), expo=served.expo)
    return json_response(response, served.headers)


class _Shape:
    """Engine outputs -> completion choices, whole or as stream chunks."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, served: Served):
        self.ctx = ctx
        self.served = served
        self.echo = body.echo
        self.logprobs = body.logprobs is not None
        self.skip_special_tokens = body.skip_special_tokens

    def prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.ctx.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=self.skip_special_tokens)

    def prompt_logprobs(self, output: RequestOutput) -> CompletionLogprobs:
        return completion_logprobs(output.prompt_token_ids, output.prompt_logprobs or [], self.ctx.token_text)[0]

    def whole_choice(self, job: Job, out: CompletionOutput) -> CompletionChoice:
        output = job.latest
        prefix = self.prompt_text(output) if self.echo else ""
        logprobs = None
        if self.logprobs:
            logprobs = self.prompt_logprobs(output) if self.echo else CompletionLogprobs()
            generated, _ = completion_logprobs(out.token_ids, out.logprobs or [], self.ctx.token_text, len(prefix))
            _extend(logprobs, generated)
        return CompletionChoice(index=self.served.choice_index(job, out.index), text=prefix + out.text,
                                logprobs=logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                alpha=job.choice.alpha)

    async def chunks(self, include_usage: bool) -> AsyncIterator[CompletionResponse]:
        served = self.served
        text_sent: dict[int, int] = {}
        tokens_sent: dict[int, int] = {}
        offsets: dict[int, int] = {}
        finished: set[int] = set()
        expo_sent = False

        def chunk(choice: CompletionChoice) -> CompletionResponse:
            nonlocal expo_sent
            response = CompletionResponse(id=served.request_id, created=served.created, model=self.ctx.model_name,
                                          choices=[choice], expo=None if expo_sent else served.expo)
            expo_sent = True
            return response

        async for job, output in served.generation.outputs():
            for out in output.outputs:
                index = served.choice_index(job, out.index)
                if index in finished:
                    continue
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
                                                                    self.ctx.token_text, offsets[index])
                    tokens_sent[index] = len(out.logprobs)
                    logprobs = _extend(logprobs or CompletionLogprobs(), generated)
                if text or logprobs:
                    yield chunk(CompletionChoice(index=index, text=text, logprobs=logprobs, alpha=job.choice.alpha))
                if out.finished:
                    finished.add(index)
                    yield chunk(CompletionChoice(index=index, text="", finish_reason=out.finish_reason,
                                                 stop_reason=out.stop_reason, alpha=job.choice.alpha))
        if include_usage:
            yield CompletionResponse(id=served.request_id, created=served.created, model=self.ctx.model_name,
                                     choices=[], usage=served.usage([job.latest for job in served.generation.jobs]))


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> CompletionLogprobs:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
    return into
