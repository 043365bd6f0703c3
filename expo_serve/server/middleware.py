"""What every request passes before its route, outermost first: the drain, the API key, the body
limit, and the last resort that answers an unexpected exception with a 500.

The drain. Shutdown without surprises: drain, cut what is left at the deadline, then stop.

`Drain.begin` (SIGTERM or SIGINT, through the runner) closes the admission gate: from then on
every new request gets 503 with Retry-After (the health check included, as `draining`), on a
listening socket that still accepts, so a load balancer can tell draining from dead. Requests
already running go on. The server stops once none is left (`poll` says when), or at the deadline
(`--shutdown-timeout` after the signal) it cuts what is left, once:
- a stream still running ends with one SSE error event (OpenAI's envelope) and `data: [DONE]`,
  between two chunks (once the server drains, streaming.event_stream races each chunk against
  `when_cut()`);
- a request whose response has not begun (a non-streaming one, or one still queued) is
  cancelled and answered 503;
each logged on one line, not as a traceback.

`DrainMiddleware` is outermost in the app: it refuses new requests while draining and counts,
and can cancel, the ones it let in.

The API key. The API key: with --api-key, every route needs it except the few `OPEN` names, each with its reason.

`OPEN` (and `is_open`) is the one place that decides which paths are open: everything else,
including a route added later, needs `Authorization: Bearer KEY` (closed by default). The check
runs before the request body is read (this middleware is outside the body limit's), so a large
body without the key costs nothing. Keys are compared in constant time.

The dashboard also serves browsers: `GET /dashboard/login` is a small form; its `POST` checks the
key and keeps, in a cookie marked HttpOnly and SameSite=Strict (Path=/dashboard), a token derived
from it (HMAC of the key: the cookie cannot be replayed as the API key elsewhere), then redirects
to the dashboard. A reverse proxy may instead send `Authorization: Bearer KEY` itself. A browser
without the key gets a 401 page with that form; other clients get the 401 envelope.

The body limit. The request-body limit: a body over --max-body-bytes is refused with 413 before it is parsed.

The body is read here (counting, so a chunked body without Content-Length is bounded too) and
handed on to the app; after it, the app's receive() sees the connection's later messages, such as
the disconnect that aborts a generation.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from urllib.parse import parse_qs

import anyio
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RETRY_AFTER_S, APIError, from_exception, invalid, shutting_down


log = logging.getLogger("expo_serve.server")


# -- the drain --------------------------------------------------------------------------------------

CUT_GRACE_S = 5.0  # after the cut, how long the cut requests have to end (they end at once)
# Served while draining: the health check (by its route: 503 `draining`), and the metrics, to watch it.
OPEN_WHILE_DRAINING = ("/health", "/metrics")


class Drain:
    def __init__(self, gate: AdmissionGate, timeout_s: float):
        self.gate = gate
        self.timeout_s = timeout_s
        self.active = 0  # requests let in and not yet answered
        self.deadline: float | None = None
        self._cut_at: float | None = None
        self._requests: set[_Admitted] = set()
        self._waiters: set[asyncio.Future] = set()

    @property
    def draining(self) -> bool:
        return self.gate.closed

    def begin(self, timeout_s: float | None = None) -> None:
        """Start draining (safe in a signal handler: it only sets flags). Idempotent."""
        if self.deadline is None:
            self.gate.close()
            self.deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def cut_now(self) -> None:
        """Bring the deadline forward to now (a second signal). Signal-safe."""
        if self.deadline is None:
            self.begin(0.0)
        else:
            self.deadline = min(self.deadline, time.monotonic())

    def poll(self) -> bool:
        """On the event loop: True once the server may stop (nothing running, or the cut is over);
        cuts what is left when the deadline has passed."""
        if self.deadline is None:
            return False
        if self.active == 0:
            return True
        now = time.monotonic()
        if self._cut_at is None and now >= self.deadline:
            self._cut(now)
        return self._cut_at is not None and now >= self._cut_at + CUT_GRACE_S

    async def wait(self, interval_s: float = 0.05) -> None:
        """Until the server may stop (for callers without uvicorn's main loop)."""
        while not self.poll():
            await asyncio.sleep(interval_s)

    def when_cut(self) -> asyncio.Future:
        """A future (of the running loop) done at the cut; cancel it when no longer needed."""
        future = asyncio.get_running_loop().create_future()
        if self._cut_at is not None:
            future.set_result(None)
        else:
            self._waiters.add(future)
            future.add_done_callback(self._waiters.discard)
        return future

    def _cut(self, now: float) -> None:
        self._cut_at = now
        if self.active:
            log.warning("Shutdown deadline (%g s) reached: cutting %d running request(s)", self.timeout_s, self.active)
        for future in list(self._waiters):
            if not future.done():
                future.set_result(None)
        for request in list(self._requests):
            if not request.started:
                request.scope.cancel()

    def _enter(self) -> "_Admitted":
        self.active += 1
        request = _Admitted()
        self._requests.add(request)
        return request

    def _leave(self, request: "_Admitted") -> None:
        self.active -= 1
        self._requests.discard(request)


class _Admitted:
    __slots__ = ("scope", "started")

    def __init__(self):
        self.scope = anyio.CancelScope()
        self.started = False


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining and scope["path"] not in OPEN_WHILE_DRAINING:
            await shutting_down(close=True).response()(scope, receive, send)
            return
        request = drain._enter()

        async def tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
            await send(message)

        try:
            with request.scope:
                await self.app(scope, receive, tracking)
            if request.scope.cancelled_caught:
                log.warning("%s %s cut at the shutdown deadline before its response began: answered 503",
                            scope["method"], scope["path"])
                if not request.started:
                    await shutting_down(close=True, cut=True).response()(scope, receive, send)
        finally:
            drain._leave(request)


# -- the bounded queue (admission) -----------------------------------------------------------------

class AdmissionGate:
    """How many sequences may be in flight before new requests get 503.

    The engine runs up to `max_num_seqs` sequences; `max_queue` more may wait in it. A request needs
    one sequence per prompt, per α and per choice (n). One that would overflow the bound is refused
    at once with 503 and Retry-After, instead of waiting where its client cannot see why; one larger
    than the whole bound could never be served (400). Counting happens on the event loop only."""

    def __init__(self, max_running: int, max_queue: int):
        self.capacity = max_running + max_queue
        self.in_flight = 0
        self.closed = False  # set when the server starts draining

    def close(self) -> None:
        """From now on every request gets 503: the server is draining."""
        self.closed = True

    def admit(self, sequences: int) -> "Ticket":
        if sequences > self.capacity:
            raise invalid(f"The request asks for {sequences} sequences (prompts × alpha values × n); this server "
                          f"takes at most {self.capacity} at once.", param="n", code="too_many_sequences")
        if self.closed:
            raise shutting_down()
        if self.in_flight + sequences > self.capacity:
            raise APIError(503, f"The server is at capacity ({self.in_flight} sequences in flight, at most "
                                f"{self.capacity}); retry after {RETRY_AFTER_S} s.",
                           code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += sequences
        return Ticket(self, sequences)


class Ticket:
    """A request's place in the gate; release it when the request ends (idempotent)."""

    def __init__(self, gate: AdmissionGate, sequences: int):
        self._gate = gate
        self._sequences = sequences

    def release(self) -> None:
        self._gate.in_flight -= self._sequences
        self._sequences = 0


# -- the API key -----------------------------------------------------------------------------------

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
            await login_page(401, "This dashboard needs the server's API key.")(scope, receive, send)
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
            response: Response = login_page(200)
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
                response = login_page(401, "That is not the server's API key.")
            else:
                response = RedirectResponse(DASHBOARD, status_code=303)
                response.set_cookie(COOKIE, self._cookie_token, path=DASHBOARD, httponly=True, samesite="strict",
                                    secure=scope.get("scheme") == "https")
        await response(scope, receive, send)


_LOGIN_PAGE = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True,
                          undefined=StrictUndefined).get_template("login.html")


def login_page(status: int, problem: str | None = None) -> HTMLResponse:
    """The dashboard's sign-in form (server/templates/login.html), with what went wrong if anything."""
    page = _LOGIN_PAGE.render(problem=problem, login_path=LOGIN_PATH)
    headers = {"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"} if status == 401 else {"Cache-Control": "no-store"}
    return HTMLResponse(page, status_code=status, headers=headers)


# -- the body limit --------------------------------------------------------------------------------

class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before sending its body: nothing to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"The request body is larger than {self.max_bytes} bytes.", code="request_too_large")
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# -- the last resort -------------------------------------------------------------------------------

class UnexpectedErrorMiddleware:
    """Any other exception: logged with its traceback and answered with the 500 envelope. Not
    re-raised (Starlette's ServerErrorMiddleware would, and uvicorn then closes the connection),
    unless the response had already begun: then closing the connection is the only signal left."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("%s %r failed", scope.get("method"), scope.get("path"))
            await from_exception(exc).response()(scope, receive, send)
