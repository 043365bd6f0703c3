"""The API key: with --api-key, every route needs it except the few `OPEN` names, each with its reason.

`OPEN` (and `is_open`) is the one place that decides which paths are open: everything else,
including a route added later, needs `Authorization: Bearer KEY` (closed by default). The check
runs before the request body is read (this middleware is outside the body limit's), so a large
body without the key costs nothing. Keys are compared in constant time.

The dashboard also serves browsers: `GET /dashboard/login` is a small form; its `POST` checks the
key and keeps, in a cookie marked HttpOnly and SameSite=Strict (Path=/dashboard), a token derived
from it (HMAC of the key: the cookie cannot be replayed as the API key elsewhere), then redirects
to the dashboard. A reverse proxy may instead send `Authorization: Bearer KEY` itself. A browser
without the key gets a 401 page with that form; other clients get the 401 envelope.
"""
from __future__ import annotations

import hashlib
import hmac
from html import escape
from urllib.parse import parse_qs

from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

DASHBOARD = "/dashboard"
LOGIN_PATH = "/dashboard/login"
COOKIE = "expo_dashboard"
LOGIN_MAX_BYTES = 4096  # the login form's body: the key, and nothing more

# path (or prefix, ending in "/") -> why it needs no key. Read by the README's security paragraph.
OPEN: dict[str, str] = {
    "/health": "load balancers and orchestrators probe it without a key; it says only ok or draining",
    "/metrics": "Prometheus scrapes it without a key; aggregate counters only "
                "(--metrics-require-key closes it)",
    "/openapi.json": "the API's description (with the α range and vocabulary size it accepts): nothing about "
                     "requests, users or experiments",
    "/docs": "the interactive page for /openapi.json",
    "/docs/oauth2-redirect": "part of the /docs page",
    "/redoc": "the other page for /openapi.json",
    "/dashboard/static/": "the dashboard's stylesheet and script, the same for every deployment",
    LOGIN_PATH: "where a browser gives the key (its body is limited to 4 KiB)",
}


def is_open(path: str, metrics_require_key: bool = False) -> bool:
    """Whether `path` is served without the API key: the one decision, for every route."""
    if path == "/metrics":
        return not metrics_require_key
    return path in OPEN or any(prefix.endswith("/") and path.startswith(prefix) for prefix in OPEN)


def takes_cookie(path: str) -> bool:
    """The dashboard's pages (not /v1: a cookie there would let other sites' forms post as the user)."""
    return path == DASHBOARD or path.startswith(DASHBOARD + "/")


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _header(scope: Scope, wanted: bytes) -> str:
    return ", ".join(value.decode("latin-1") for name, value in scope.get("headers", ()) if name == wanted)


def _cookie(scope: Scope, name: str) -> str | None:
    for part in _header(scope, b"cookie").replace(",", ";").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip()
    return None


def unauthorized(message: str = "Invalid or missing API key: send 'Authorization: Bearer KEY'.") -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, metrics_require_key: bool = False):
        self.app = app
        self._key = api_key.encode()
        self._cookie_token = hmac.new(self._key, b"expo-serve dashboard cookie", hashlib.sha256).hexdigest()
        self._metrics_require_key = metrics_require_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == LOGIN_PATH:
            await self._login(scope, receive, send)
            return
        if is_open(path, self._metrics_require_key) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if takes_cookie(path) and "text/html" in _header(scope, b"accept"):
            await _login_page(401, "This dashboard needs the server's API key.")(scope, receive, send)
            return
        message = None
        if takes_cookie(path):
            message = (f"Invalid or missing API key: send 'Authorization: Bearer KEY', or sign in at {LOGIN_PATH} "
                       "(the key is then kept in an HttpOnly cookie for the dashboard).")
        await (unauthorized(message) if message else unauthorized()).response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        token = bearer_token(scope)
        if token is not None and hmac.compare_digest(token.encode(), self._key):
            return True
        if takes_cookie(scope["path"]):
            cookie = _cookie(scope, COOKIE)
            return cookie is not None and hmac.compare_digest(cookie.encode(), self._cookie_token.encode())
        return False

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD"):
            response: Response = _login_page(200)
        elif scope["method"] != "POST":
            response = APIError(405, "Method Not Allowed", code="method_not_allowed",
                                headers={"Allow": "GET, HEAD, POST"}).response()
        else:
            body = bytearray()
            while True:  # read here, before the body limit: bounded here, more tightly
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > LOGIN_MAX_BYTES:
                    error = APIError(413, f"The sign-in form is larger than {LOGIN_MAX_BYTES} bytes.",
                                     code="request_too_large")
                    await error.response()(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
            given = (form.get("api_key") or [""])[0].strip()
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self._key):
                response = _login_page(401, "That is not the server's API key.")
            else:
                response = RedirectResponse(DASHBOARD, status_code=303)
                response.set_cookie(COOKIE, self._cookie_token, path=DASHBOARD, httponly=True, samesite="strict",
                                    secure=scope.get("scheme") == "https")
        await response(scope, receive, send)


def _login_page(status: int, problem: str | None = None) -> HTMLResponse:
    note = f'<p class="problem">{escape(problem)}</p>' if problem else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>expo-serve: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body><main class="login"><h1>expo-serve · α experiments</h1>{note}
<p>This server was started with <code>--api-key</code>. Enter the key to open the dashboard: it is kept
in a cookie for this site's <code>/dashboard</code> pages only (HttpOnly, SameSite=Strict). A reverse proxy
may instead send <code>Authorization: Bearer KEY</code> with each request.</p>
<form method="post" action="{LOGIN_PATH}"><label>API key <input type="password" name="api_key"
autocomplete="current-password" required autofocus></label> <button type="submit">Open the dashboard</button></form>
</main></body></html>"""
    headers = {"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"} if status == 401 else {"Cache-Control": "no-store"}
    return HTMLResponse(page, status_code=status, headers=headers)
