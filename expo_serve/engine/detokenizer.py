"""Incremental detokenization and stop strings.

Decoding token by token is wrong for byte-level and sentencepiece vocabularies (a character can
span tokens, a leading space depends on the previous token), and decoding everything each step
is quadratic. So each step decodes a short window: the text of tokens[prefix:] minus that of
tokens[prefix:read], kept only once it no longer ends in an incomplete character.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for their spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: the text still held back (bytes of a character that never
        completed decode to U+FFFD, as the tokenizer's own decode gives them)."""
        if self.read_offset == len(self.ids):
            return ""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that the last `new_chars` characters completed: (index, stop)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string, so must not be streamed yet."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest
