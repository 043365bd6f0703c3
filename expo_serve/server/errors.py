"""Every failure in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.

One set of handlers covers them all: FastAPI's validation errors (400 here, never 422), the
engine's InvalidRequest, HTTP errors (unknown routes, wrong methods), the server's own APIError,
and anything unexpected (500, logged with its traceback).
"""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.sampling_params import InvalidRequest
from .disconnect import ClientDisconnected

_TYPES = {401: "authentication_error", 403: "permission_error",
          429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


class APIError(Exception):
    """A failure the server answers with `status` and OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers

    def envelope(self) -> dict:
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """The APIError an exception maps to (for handlers, and for errors that happen mid-stream)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnected):  # nobody reads it; the access log shows 499
        return APIError(499, "The client closed the request.", code="client_closed_request")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))
    return APIError(500, "The server failed while handling the request; it has been logged.", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    # An unexpected exception is logged with its traceback by the ASGI server: Starlette re-raises
    # it once this handler has produced the 500.
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    for kind in (APIError, ClientDisconnected, InvalidRequest, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)


# -- validation errors -----------------------------------------------------------------------------
# pydantic names the member of a union it tried ("str", "list[int]", "function-after[…]") inside an
# error's location; those are not fields, so `param` leaves them out.
_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[A-Z]\w*)$|[\[\]-]")


def _from_validation(exc: RequestValidationError) -> APIError:
    error = exc.errors()[0]
    loc = list(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "invalid JSON")
        return invalid(f"The request body is not valid JSON ({detail}).", code="invalid_json")
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = _param_path(loc)
    if error.get("type") == "missing":
        return invalid(f"'{param}' is required.", param=param, code="missing_field")
    if not param:
        return invalid(f"The request body is invalid: {error.get('msg', 'not a JSON object')}.", code="invalid_body")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid(f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")


def _param_path(loc: list) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.search(str(part)):
            path += f".{part}" if path else str(part)
    return path or None
