"""A request inside the engine: what it asks for, the sequences it becomes, what it gets back.

SamplingParams (α, length, sampling, penalties, stops, logprobs) arrive with a request; each of
its n choices is a Sequence (tokens, KV blocks, α, sampling state, text so far); the engine
returns RequestOutputs holding one CompletionOutput per choice.

Text is detokenized incrementally. Decoding token by token is wrong for byte-level and
sentencepiece vocabularies (a character can span tokens, a leading space depends on the previous
token), and decoding everything each step is quadratic. So each step decodes a short window: the
text of tokens[prefix:] minus that of tokens[prefix:read], kept only once it no longer ends in an
incomplete character; a finished sequence flushes what is held back.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

# -- what a request asks for ----------------------------------------------------------------------

MAX_LOGPROBS = 20


class InvalidRequest(ValueError):
    """A request the engine cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class AlphaRange:
    """The α values an engine serves and the one a request gets when it names none.

    The one owner of α's bounds: the engine's config holds it, the server's settings make it, and
    `check` is the one place a request's α is judged (LLMEngine.add_request)."""

    default: float = 0.0
    min: float = -1.0
    max: float = 25.0

    def __post_init__(self):
        for name in ("default", "min", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"alpha {name} must be a finite number, got {value!r}")
        if not self.min <= self.default <= self.max:
            raise ValueError(f"the default alpha {self.default:g} is outside [{self.min:g}, {self.max:g}]")

    def check(self, alpha) -> float:
        """`alpha` (None: the default) as served; InvalidRequest if it is not a number in range."""
        if alpha is None:
            return float(self.default)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise InvalidRequest(f"alpha must be a finite number, got {alpha!r}", "alpha", "invalid_alpha")
        if not self.min <= alpha <= self.max:
            raise InvalidRequest(f"alpha must be in [{self.min:g}, {self.max:g}], got {alpha:g}", "alpha",
                                 "alpha_out_of_range")
        return float(alpha)


@dataclass
class SamplingParams:
    alpha: float | None = None  # None: the engine's default α (the engine checks α: AlphaRange)
    max_tokens: int | None = 16  # None: up to the context window, at most default_max_tokens
    default_max_tokens: int | None = None  # a server's cap on requests that give no max_tokens (None: none)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top alternatives per generated token (0: just the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    n: int = 1
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop]
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise InvalidRequest("top_p must be in (0, 1]", "top_p")
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty == 0.0:
            raise InvalidRequest("repetition_penalty must be positive", "repetition_penalty")
        _check_int("top_k", self.top_k, low=-1)
        _check_int("min_tokens", self.min_tokens, low=0)
        _check_int("n", self.n, low=1, high=128)
        for name in ("max_tokens", "default_max_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**64 - 1)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=MAX_LOGPROBS)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("every stop sequence must be a non-empty string", "stop")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be finite, got {value}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequest(f"{name} must be in [{low}, {high}], got {value}", name)


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequest(f"{name} must be in [{low}, {high}], got {value}", name)


# -- what the engine returns ----------------------------------------------------------------------

@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" while finished, else None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    alpha: float
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    finished: bool = False

    # The single-choice shorthand of DESIGN.md §5: outs[i].text, outs[i].token_ids.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids



def top_logprobs(log_probs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row: the chosen token's logprob and the k best alternatives."""
    chosen_lp = log_probs.gather(1, chosen[:, None]).squeeze(1).tolist()
    chosen_ids = chosen.tolist()
    if k > 0:
        values, indices = log_probs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(chosen_ids, chosen_lp, tops)]


# -- incremental detokenization and stop strings --------------------------------------------------

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


# -- one sequence being generated -----------------------------------------------------------------

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
