"""A non-streaming request whose client hangs up stops generating at once.

The handler's work runs as a task beside a watcher of the connection. Once the body has been
read, the next ASGI message is `http.disconnect`, sent when the client goes away (or after the
response is complete). If it comes first, the work is cancelled, and its clean-up aborts the
engine requests, which frees their KV blocks at the engine's next step.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    try:
        await task  # let its clean-up run before the caller does its own
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
