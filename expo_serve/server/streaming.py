"""Server-sent events in OpenAI's framing: `data: {chunk}` events, then `data: [DONE]`.

A failure after the stream has begun cannot change the status any more, so it is sent as one
`data: {"error": …}` event (OpenAI's envelope), followed by `[DONE]`. A client that disconnects
cancels the stream; the clean-up (`on_close`) then aborts its engine requests. On shutdown the
stream is left `grace_s` seconds to finish before it is cut.
"""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from .errors import from_exception

log = logging.getLogger("expo_serve.server")

DONE = "[DONE]"


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

    async def events() -> AsyncIterator[str]:
        aborted = True
        try:
            try:
                async for chunk in chunks:
                    yield wire(chunk)
            except Exception as exc:  # noqa: BLE001 - every failure mid-stream becomes an error event
                error = from_exception(exc)
                if error.status >= 500:
                    log.error("stream failed", exc_info=exc)
                yield json.dumps(error.envelope())
            aborted = False
            yield DONE
        finally:
            on_close(aborted)

    async def close_if_never_started() -> None:
        # A stream cancelled before it began never runs `events`' `finally`; this does it then.
        # (Async, so that it runs on the event loop, not in a worker thread.)
        on_close(True)

    return EventSourceResponse(events(), headers=headers, sep="\n", shutdown_grace_period=grace_s,
                               background=BackgroundTask(close_if_never_started))
