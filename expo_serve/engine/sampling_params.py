"""What a request asks for: α, length, sampling, penalties, stops, logprobs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20


class InvalidRequest(ValueError):
    """A request the engine cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    alpha: float | None = None  # None: the engine's default α
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
        if self.alpha is not None:
            _check_number("alpha", self.alpha)
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
