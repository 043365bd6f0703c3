"""Server-sent events in OpenAI's framing: `data: {chunk}` events, then `data: [DONE]`.

A failure after the stream has begun cannot change the status any more, so it is sent as one
`data: {"error": …}` event (OpenAI's envelope), followed by `[DONE]`. A client that disconnects
cancels the stream; the clean-up (`on_close`) then aborts its engine requests. On shutdown a
running stream goes on until the drain's deadline (drain.Drain, found on the app's state); then
it ends between two chunks with an error event (`server_shutting_down`) and `[DONE]`, logged on
one line. (`grace_s` is the library's own last resort, should its shutdown signal come first.)
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from starlette.types import Receive, Scope, Send

from .admission import shutting_down
from .errors import from_exception

log = logging.getLogger("expo_serve.server")

DONE = "[DONE]"
_END = object()


class StreamCut(Exception):
    """The server's shutdown deadline came before the stream's end."""


def wire(chunk: BaseModel) -> str:
    """A chunk as OpenAI sends it: fields that are None are left out, except inside the `expo`
    object, whose four keys are always there."""
    data = chunk.model_dump(mode="json", exclude_none=True)
    expo = getattr(chunk, "expo", None)
    if expo is not None:
        data["expo"] = expo.model_dump(mode="json")
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def event_stream(chunks: AsyncIterator[BaseModel], on_close: Callable[[bool], None], headers: dict[str, str],
                 grace_s: float) -> EventSourceResponse:
    """`on_close(aborted)` runs when the stream ends for any reason (it must be idempotent and
    must not await: it may run in a task that is being cancelled)."""

    response: _Stream

    async def events() -> AsyncIterator[str]:
        aborted = True
        drain = response.drain
        stop = None  # done at the cut; watched once the server drains (racing costs a task per chunk)
        iterator = chunks.__aiter__()
        try:
            try:
                while True:
                    if stop is None and drain is not None and drain.draining:
                        stop = drain.when_cut()
                    chunk = await (_step(iterator) if stop is None else _next_unless_cut(iterator, stop))
                    if chunk is _END:
                        break
                    yield wire(chunk)
                aborted = False
            except StreamCut:
                log.warning("stream %s cut at the shutdown deadline: ended with an error event",
                            headers.get("x-request-id", ""))
                yield json.dumps(shutting_down(cut=True).envelope())
            except Exception as exc:  # noqa: BLE001 - every failure mid-stream becomes an error event
                error = from_exception(exc)
                if error.status >= 500:
                    log.error("stream failed", exc_info=exc)
                yield json.dumps(error.envelope())
                aborted = False
            yield DONE
        finally:
            if stop is not None:
                stop.cancel()
            on_close(aborted)

    async def close_if_never_started() -> None:
        # A stream cancelled before it began never runs `events`' `finally`; this does it then.
        # (Async, so that it runs on the event loop, not in a worker thread.)
        on_close(True)

    response = _Stream(events(), headers=headers, sep="\n", shutdown_grace_period=grace_s,
                       background=BackgroundTask(close_if_never_started))
    return response


class _Stream(EventSourceResponse):
    """An EventSourceResponse that finds the server's drain (if any) when it starts."""

    drain = None  # drain.Drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.drain = getattr(getattr(scope.get("app"), "state", None), "drain", None)
        await super().__call__(scope, receive, send)


async def _next_unless_cut(iterator: AsyncIterator, stop: asyncio.Future):
    """The next chunk (`_END` after the last), or StreamCut once `stop` is done, whichever first."""
    if stop.done():
        raise StreamCut()
    step = asyncio.ensure_future(_step(iterator))
    try:
        await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not step.done():
            step.cancel()
    if step.done() and not step.cancelled():
        return step.result()
    await asyncio.wait((step,))  # let the chunks' clean-up run before the error event is sent
    raise StreamCut()


async def _step(iterator: AsyncIterator):
    """The next chunk, or `_END` after the last."""
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _END
