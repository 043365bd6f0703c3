"""One sequence being generated: its tokens, KV blocks, α, sampling state and text so far."""
from __future__ import annotations

import itertools
import time
from enum import Enum

import torch

from .detokenizer import IncrementalDetokenizer, find_stop, stop_holdback
from .outputs import CompletionOutput, TokenLogprob
from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 alpha: float, max_tokens: int, stop_token_ids: set[int], tokenizer, seed: int | None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.alpha = alpha
        self.max_tokens = max_tokens
        self.stop_token_ids = stop_token_ids
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose keys and values are in the cache
        self.block_table: list[int] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        # A per-sequence generator: the same seed gives the same draws whatever shares the batch.
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    # -- progress ----------------------------------------------------------------------------
    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Add a sampled token, update the text, and finish if a stop condition holds."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        n = self.num_output_tokens
        if token_id in self.stop_token_ids and n > self.params.min_tokens:
            self.finish("stop", token_id)
            return
        new_text = self._detokenizer.add(token_id)
        self.text += new_text
        if self.params.stop and new_text and n > self.params.min_tokens:
            found = find_stop(self.text, len(new_text), self.params.stop)
            if found:
                self.text = self.text[: found[0]]
                self.finish("stop", found[1])
                return
        if n >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if not isinstance(stop_reason, str):  # a stop string cut the text: what follows it is dropped
            self.text += self._detokenizer.flush()
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone; prompt and output so far are computed again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = Status.WAITING

    def snapshot(self) -> CompletionOutput:
        """The output so far. While running, text that may be the start of a stop string is held back."""
        text = self.text
        if not self.finished and self.params.stop:
            held = stop_holdback(text, self.params.stop)
            text = text[: len(text) - held] if held else text
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        return CompletionOutput(self.index, text, self.output_token_ids, self.finish_reason, self.stop_reason, logprobs)
