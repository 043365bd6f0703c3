"""Two answers to one chat, one per α, in one batch: the generator the experiments' pairwise
battles are given (expo_serve.experiments.api.GeneratePair)."""
from __future__ import annotations

import uuid
from typing import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from ..engine.request import SamplingParams
from .alpha import AlphaChoice, expo_of
from .protocol import ChatMessage
from .serving import ServingContext
from .templates import render_chat

GeneratePair = Callable[..., Awaitable[list[str]]]


def pair_generator(ctx: ServingContext) -> GeneratePair:
    async def generate_pair(messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                            temperature: float | None = None) -> list[str]:
        """One text per α, in the order given; sampled like a chat request with these options."""
        prompt = await run_in_threadpool(render_chat, ctx.tokenizer, [ChatMessage.model_validate(m) for m in messages])
        params = SamplingParams(max_tokens=max_tokens, default_max_tokens=ctx.max_tokens_default,
                                temperature=1.0 if temperature is None else temperature)
        choices = [AlphaChoice(ctx.policy.check(float(alpha))) for alpha in alphas]
        ticket = ctx.admit(len(choices))
        served = await ctx.launch(f"battle-{uuid.uuid4().hex}", [prompt], params, choices, ticket,
                                  expo_of(choices, sweep=True), http=None)
        finals = await served.collect(None)
        return [out.outputs[0].text for out in finals]

    return generate_pair
