"""Engine logprobs in OpenAI's two shapes: chat's `content` list and completions' parallel lists.

A token is shown as the text it decodes to on its own (special tokens included). A logprob of
-inf (a token the sampler could never pick) is shown as -9999.0, as OpenAI does, since JSON has
no infinity.
"""
from __future__ import annotations

from functools import lru_cache

from ..engine.request import TokenLogprob
from .protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob >= FLOOR else FLOOR  # also maps NaN (never >=) to the floor


class TokenText:
    """Token id -> its text, cached: logprobs name the same tokens over and over."""

    def __init__(self, tokenizer, cache_size: int = 1 << 16):
        self._tokenizer = tokenizer
        self.of = lru_cache(maxsize=cache_size)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> list[ChatTokenLogprob]:
    content = []
    for entry in entries:
        token = text.of(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            alt = text.of(token_id)
            top.append(TopLogprob(token=alt, logprob=_finite(logprob), bytes=list(alt.encode())))
        content.append(ChatTokenLogprob(token=token, logprob=_finite(entry.logprob), bytes=list(token.encode()),
                                        top_logprobs=top))
    return content


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], text: TokenText,
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The lists for `token_ids` (an entry is None for a prompt's first token, which has no
    logprob), with text offsets counted from `offset`; returns them and the offset after them."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = text.of(token_id)
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
            alt = text.of(alt_id)
            top[alt] = max(top.get(alt, FLOOR), _finite(logprob))
        result.top_logprobs.append(top)
    return result, offset
