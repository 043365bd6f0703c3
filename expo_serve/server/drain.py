"""Shutdown without surprises: drain, cut what is left at the deadline, then stop.

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
"""
from __future__ import annotations

import asyncio
import logging
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import AdmissionGate, shutting_down

log = logging.getLogger("expo_serve.server")

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
