"""What both HTTP layers (server/ and experiments/) share about request bodies and the errors they get.

- JSON's kinds as request fields take them: `Number`, `Integer`, `Flag` (no strings, no NaN).
- OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}` and its types.
- `RequestBody`, the base of every request body model, reads the body once before its fields:
  every string must be valid UTF-8 text (JSON's `"\\ud800"` decodes to a lone surrogate, which the
  tokenizer, the store, the log and the response encoder all fail on), and a number such as 3.0
  is the integer JSON Schema says it is.
- Pydantic's validation errors and FastAPI's body-parsing failures in the caller's words.
- `quote`: how an error message shows a client's string (escaped, cut short).
"""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AllowInfNan, BaseModel, Strict, model_validator
from pydantic_core import PydanticCustomError

Number = Annotated[float, Strict(), AllowInfNan(False)]
Integer = Annotated[int, Strict()]  # 3.0 too: RequestBody reads it as 3
Flag = Annotated[bool, Strict()]

# OpenAI answers a missing or wrong API key with `invalid_request_error` (code `invalid_api_key`);
# every 401 here, the admin key's included, uses that type.
_TYPES = {403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def quote(text: str, limit: int = 64) -> str:
    """A client's string as an error message shows it: escaped as repr escapes it (no raw
    control characters or surrogates reach the log or the response) and cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# -- valid text ------------------------------------------------------------------------------------
def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text(data: Any, *, integral_floats_to_int: bool = False) -> str | None:
    """Where parsed JSON holds a string (or key) that is not valid UTF-8: its path, such as
    `messages[0].content` ("" for the body itself, when a top-level key is bad), or None.
    Optionally turns 3.0 into 3 on the way, in place. Iterative, so that a deeply nested body
    cannot exhaust the stack."""
    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return path
        elif isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not _is_text(key):
                    return path
                if integral_floats_to_int and isinstance(item, float) and item.is_integer():
                    value[key] = int(item)
                elif isinstance(item, (str, dict, list)):
                    if isinstance(key, int):
                        stack.append((item, f"{path}[{key}]"))
                    else:
                        stack.append((item, f"{path}.{key}" if path else key))
    return None


class RequestBody(BaseModel):
    """Base of every request body model: the body is read once, before any field is."""

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        where = invalid_text(data, integral_floats_to_int=True)
        if where is not None:
            raise PydanticCustomError("invalid_text", "not valid UTF-8 text (it holds a lone surrogate)",
                                      {"param": where})
        return data


# -- failures in the caller's words ----------------------------------------------------------------
# pydantic names the member of a union it tried ("str", "list[int]", "function-after[…]") inside an
# error's location; those are not fields, so `param` leaves them out.
_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[A-Z]\w*)$|[\[\]-]")
_LOCATIONS = {"body", "query", "path", "header", "cookie"}
_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type"}


def param_path(loc: list | tuple) -> str | None:
    """`messages[0].content` from pydantic's ("body", "messages", 0, "content")."""
    path = ""
    for index, part in enumerate(loc):
        if index == 0 and part in _LOCATIONS:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.search(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def describe(error: dict) -> tuple[str, str | None, str]:
    """(message, param, code) for one of pydantic's (or FastAPI's) validation errors."""
    kind = error.get("type")
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    ctx = error.get("ctx") or {}
    if kind == "json_invalid":
        return f"The request body is not valid JSON ({ctx.get('error', 'syntax error')}).", None, "invalid_json"
    if kind == "invalid_text":
        where = ctx.get("param") or None
        return f"{quote(where) if where else 'A key of the request body'} is {msg}.", where, "invalid_utf8"
    param = param_path(error.get("loc", ()))
    if param is None:
        if kind == "missing":
            return "The request body is empty: send a JSON object.", None, "missing_body"
        if kind in _NOT_AN_OBJECT:
            return "The request body must be a JSON object (sent as application/json).", None, "invalid_json"
        return f"The request body is invalid: {msg}.", None, "invalid_value"
    if kind == "missing":
        return f"{quote(param)} is required.", param, "missing_field"
    if kind == "extra_forbidden":  # the path may hold a client's key: quoted
        return f"Unknown field {quote(param)}.", param, "unknown_field"
    return f"Invalid value for {quote(param)}: {msg}.", param, "invalid_value"


def unparsable_body(exc: BaseException) -> tuple[str, str]:
    """(message, code) for FastAPI's 400 "There was an error parsing the body", from its cause."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"The request body is not valid UTF-8 (byte {cause.start} cannot be decoded).", "invalid_utf8"
    if isinstance(cause, RecursionError):
        return "The request body is nested too deeply.", "invalid_json"
    return "The request body cannot be parsed as JSON.", "invalid_json"
