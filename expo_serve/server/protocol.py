"""The HTTP shapes: OpenAI's request and response bodies, plus the ExPO fields (DESIGN.md §6).

Requests are permissive about what they do not know (unknown fields are ignored, `model` may be
left out) and strict about what they do: numbers are JSON numbers (not strings, not booleans, not
NaN or Infinity), flags are JSON booleans. Ranges are checked by the engine's SamplingParams, so
they live in one place.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError

MAX_ALPHAS = 8  # an α sweep: one choice per α, all in one batch
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

Number = Annotated[float, Strict(), AllowInfNan(False)]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


def _alpha(value: Any) -> float | list[float] | None:
    """A number or a list of 1 to 8 numbers; booleans, strings, NaN and ±Infinity are refused."""

    def number(item: Any) -> float:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise PydanticCustomError("alpha", "alpha must be a number or a list of numbers, got {kind}",
                                      {"kind": type(item).__name__})
        if not math.isfinite(item):
            raise PydanticCustomError("alpha", "alpha must be finite, got {value}", {"value": str(item)})
        return float(item)

    if value is None:
        return None
    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_ALPHAS:
            raise PydanticCustomError("alpha", "an alpha sweep lists 1 to {most} values, got {count}",
                                      {"most": MAX_ALPHAS, "count": len(value)})
        return [number(item) for item in value]
    return number(value)


AlphaValue = Annotated[float | list[float] | None, BeforeValidator(_alpha)]


class Permissive(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Permissive):
    include_usage: Flag = False


class GenerationRequest(Permissive):
    """What chat and completion requests share: the model, α, sampling, stops and streaming."""

    model: str | None = Field(None, description="the served model's id (may be omitted)")
    alpha: AlphaValue = Field(None, description=f"ExPO strength α, or a list of up to {MAX_ALPHAS} values for an "
                                                "α sweep (one choice per α); default: the server's")
    experiment: str | None = Field(None, description="the α experiment (A/B test) to join")
    user: str | None = Field(None, description="the A/B assignment unit (or the X-ExPO-Unit header)")
    n: Integer = Field(1, ge=1, le=128)
    max_tokens: Integer | None = Field(None, ge=0)
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: Integer | None = None
    min_p: Number | None = None
    seed: Integer | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[Integer] | None = None
    ignore_eos: Flag = False
    min_tokens: Integer = 0
    skip_special_tokens: Flag = True
    logit_bias: dict[str, Number] | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None


class ContentPart(Permissive):
    type: str
    text: str | None = None


class ChatMessage(Permissive):
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = Field(None, ge=0)
    logprobs: Flag = False
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


TokenIds = list[Integer]


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Integer | None = Field(16, ge=0)
    echo: Flag = False
    logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: Integer | None = None


class TokenizeRequest(Permissive):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: Flag = True


class DetokenizeRequest(Permissive):
    model: str | None = None
    tokens: list[Integer]


# -- responses -----------------------------------------------------------------------------------------
class Expo(BaseModel):
    alpha: float | list[float] = Field(description="the α that served the request (the list, for an α sweep)")
    experiment: str | None = None
    arm: str | None = None
    exposure_id: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    alpha: float


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    expo: Expo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    alpha: float


class ChatCompletionChunk(BaseModel):
    """Streamed without its None fields (see streaming.wire): `expo` and `usage` only where set."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    expo: Expo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    alpha: float


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    expo: Expo | None = None


class AlphaRange(BaseModel):
    default: float
    min: float
    max: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "expo-serve"
    max_model_len: int
    alpha: AlphaRange


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "draining"]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
