"""Every failure in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.

One set of handlers covers them all: FastAPI's validation errors (400 here, never 422), the
engine's InvalidRequest, HTTP errors (unknown routes, wrong methods), the server's own APIError,
and anything unexpected: a 500 whose traceback goes to the log, answered without closing the
connection (uvicorn closes a keep-alive connection when an exception reaches it).
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..api_common import describe, envelope, error_type, unparsable_body
from ..engine.request import InvalidRequest


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


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


RETRY_AFTER_S = 1


def shutting_down(close: bool = False, cut: bool = False) -> APIError:
    """The 503 of a draining server (with `close`, the connection closes after it: the client's
    next request goes to a fresh connection, on another replica behind a balancer)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} | ({"Connection": "close"} if close else {})
    message = ("The server reached its shutdown deadline before this request finished; retry on another replica "
               "or later." if cut else "The server is shutting down; retry on another replica or later.")
    return APIError(503, message, code="server_shutting_down", headers=headers)


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
        message, param, code = describe(exc.errors()[0])
        return invalid(message, param, code)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            message, code = unparsable_body(exc)
            return invalid(message, code=code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))
    return APIError(500, "The server failed while handling the request; it has been logged.", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        if error.status == 405:
            error.headers = {**(error.headers or {}), "Allow": _allowed_methods(request)}
        return error.response()

    # `Exception` goes to Starlette's outermost ServerErrorMiddleware (it answers, then re-raises),
    # which sees only failures in the middleware outside middleware.UnexpectedErrorMiddleware
    # (app.py installs it innermost).
    for kind in (APIError, ClientDisconnected, InvalidRequest, RequestValidationError, StarletteHTTPException,
                 Exception):
        app.add_exception_handler(kind, handle)


def _allowed_methods(request: Request) -> str:
    """Every method some route at this path answers. Starlette's 405 names only the first route's
    (`Allow: GET` for /v1/experiments, whose POST is another route), so each method is tried."""
    routes = request.app.router.routes
    allowed = [method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]
    return ", ".join(allowed)
