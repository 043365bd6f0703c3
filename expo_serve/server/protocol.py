"""The HTTP shapes: OpenAI's request and response bodies, plus the ExPO fields (DESIGN.md §6).

Requests are permissive about what they do not know (unknown fields are ignored, `model` may be
left out) and strict about what they do: numbers are JSON numbers (not strings, not booleans, not
NaN or Infinity), flags are JSON booleans, and every string is valid UTF-8 (api_common.RequestBody).
Ranges are OpenAI's (vLLM's for its extra fields) and stated here, so that /openapi.json says them;
what only the running engine knows (the vocabulary, the α range, the prompt's length) it checks
itself, and app.py writes the first two into the schema.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..api_common import ErrorInfo, ErrorResponse, Flag, Integer, Number, RequestBody, quote  # noqa: F401 - shared
from ..engine.request import SamplingParams

# Request fields that map one to one onto SamplingParams; left out (None), the engine's default holds.
_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "stop_token_ids")
MAX_ALPHAS = 8  # an α sweep: one choice per α, all in one batch
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

# Bounds only the running server knows; app.py fills them into /openapi.json.
SERVER_BOUND = "x-server-bound"
TokenId = Annotated[Integer, Field(ge=0, json_schema_extra={SERVER_BOUND: "token_id"})]
AlphaNumber = Annotated[float, Field(json_schema_extra={SERVER_BOUND: "alpha"})]


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


AlphaValue = Annotated[AlphaNumber | Annotated[list[AlphaNumber], Field(min_length=1, max_length=MAX_ALPHAS)] | None,
                      BeforeValidator(_alpha)]


def _stop(value: Any) -> Any:
    """A string or up to 4 strings, said in those words (a union's first error would be "not a string")."""
    strings = [value] if isinstance(value, str) else value
    if value is None or (isinstance(strings, list) and len(strings) <= MAX_STOP
                         and all(isinstance(s, str) for s in strings)):
        return value
    raise PydanticCustomError("stop", "must be a string or a list of at most {most} strings", {"most": MAX_STOP})


Stop = Annotated[str | Annotated[list[str], Field(max_length=MAX_STOP)] | None, BeforeValidator(_stop)]


def _needs(field: str, flag: str) -> dict:
    """JSON Schema for a cross-field rule: `field`, when given (not null), needs `flag: true`."""
    return {"if": {"properties": {field: {"not": {"type": "null"}}}, "required": [field]},
            "then": {"properties": {flag: {"const": True}}, "required": [flag]}}


class Permissive(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Permissive):
    include_usage: Flag = False


class GenerationRequest(RequestBody):
    """What chat and completion requests share: the model, α, sampling, stops and streaming."""

    model: str | None = Field(None, description="the served model's id (may be omitted)")
    alpha: AlphaValue = Field(None, description=f"ExPO strength α, or a list of up to {MAX_ALPHAS} values for an "
                                                "α sweep (one choice per α); default: the server's")
    experiment: str | None = Field(None, description="the α experiment (A/B test) to join")
    user: str | None = Field(None, description="the A/B assignment unit (or the X-ExPO-Unit header)")
    n: Integer = Field(1, ge=1, le=128)
    max_tokens: Integer | None = Field(None, ge=0, description="default: the server's --max-tokens-default, "
                                                               "or what room the context window leaves")
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: Integer | None = Field(None, ge=-1, description="sample from the k likeliest tokens; -1 or 0: all (as vLLM)")
    min_p: Number | None = Field(None, ge=0, le=1)
    seed: Integer | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(None, gt=0)
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: Flag = False
    min_tokens: Integer = Field(0, ge=0, description="at most max_tokens")
    skip_special_tokens: Flag = True
    logit_bias: dict[str, Number] | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, *, max_tokens: int | None, default_max_tokens: int | None,
                        logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine parameters of this body, α left for the server to decide. With no `max_tokens`,
        the engine generates up to `default_max_tokens` (the server's cap), fewer if the window has less room."""
        options = {name: getattr(self, name) for name in _SAME_NAME if getattr(self, name) is not None}
        return SamplingParams(alpha=None, max_tokens=max_tokens, default_max_tokens=default_max_tokens,
                              stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, n=self.n, skip_special_tokens=self.skip_special_tokens,
                              **options)


class ContentPart(Permissive):
    """Only text parts are supported."""
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":  # said of the part, not of its `type`
            raise PydanticCustomError("content", "only text content is supported, got a {kind} part",
                                      {"kind": quote(str(data.get("type")))})
        return data


class ChatMessage(Permissive):
    role: str = Field(min_length=1)
    # The list first: for a bad part, pydantic's first error is then about the part, not "not a string".
    content: list[ContentPart] | str | None = None
    name: str | None = None

    def template_form(self) -> dict:
        """The message as chat templates expect it: string content (text parts joined), and the
        newer `developer` role as `system`, which templates know."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        plain = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            plain["name"] = self.name
        return plain


class ChatCompletionRequest(GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_needs("top_logprobs", "logprobs"),
                                                           _needs("stream_options", "stream")]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = Field(None, ge=0)
    logprobs: Flag = False
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


TokenIds = list[TokenId]


class CompletionRequest(GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_needs("stream_options", "stream")]})

    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Integer | None = Field(16, ge=0)
    echo: Flag = False
    logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: Integer | None = Field(None, ge=1, description="must equal n on this server")

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch of them: text, token ids, a list of texts, or a list of token-id lists."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(RequestBody):
    """Exactly one of `prompt` (text, encoded as completions encode it) or `messages` (through the chat template)."""
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: Flag = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


# Errors the routes document in /openapi.json.
DOCUMENTED_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model or experiment"),
    (413, "Request body too large"), (503, "Queue full (see Retry-After) or shutting down"))}


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


class AlphaBounds(BaseModel):
    default: float
    min: float
    max: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "expo-serve"
    max_model_len: int
    alpha: AlphaBounds


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
    status: Literal["ok", "draining", "failed"]
