"""The API key: with --api-key, every /v1/* request needs `Authorization: Bearer KEY`.

Checked by path in middleware rather than per route, so that a route added under /v1 later (the
experiments') is protected without anyone remembering to. Compared in constant time.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

PROTECTED_PREFIX = "/v1/"


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            token = bearer_token(scope)
            if token is None or not hmac.compare_digest(token.encode(), self._key):
                error = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer KEY'.",
                                 type="invalid_request_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
