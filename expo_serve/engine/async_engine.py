"""The engine behind a server: one background thread steps it; asyncio callers stream from it.

All engine state is touched only by the engine thread. Callers send commands (add, abort) through
a queue and receive outputs on their own asyncio queue. A caller that stops iterating (a client
gone, a task cancelled) aborts its request, and the abort frees its KV blocks at the start of the
next step.

A RequestGroup runs several engine requests together and reads them as one stream: a server's
request becomes one engine request per prompt and per α (an α sweep's values share the engine's
batches).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import torch

from .llm_engine import EngineStats, LLMEngine
from .request import AlphaRange, RequestOutput, SamplingParams

log = logging.getLogger("expo_serve.engine")


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expo-engine", daemon=True)
        self._stats = engine.stats()
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def alpha_range(self) -> AlphaRange:
        return self.engine.config.alpha

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def stats(self) -> EngineStats:
        """The counts after the last step (safe to read from any thread)."""
        return self._stats

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer run (a tensor-parallel rank died), or None."""
        return self.engine.failure

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step it takes part in; the last is finished.

        Raises InvalidRequest before the first output if the request cannot be served."""
        request_id = request_id or uuid.uuid4().hex
        if self.engine.failure is not None:
            raise RuntimeError(f"generation failed: {self.engine.failure}")
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        accepted: Future = Future()
        self._commands.put(("add", request_id, prompt, params, sink, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # the engine may have taken it meanwhile
            raise
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let running requests finish (up to `timeout` seconds), then stop the thread and the
        engine's tensor-parallel workers, if any."""
        self._commands.put(("drain",))
        # A failed engine has nothing to finish (its thread may even be stuck in a dead rank's collective).
        self._thread.join(timeout if self.engine.failure is None else 1.0)
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(5.0)
        self.engine.close()

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        draining = False
        with torch.inference_mode():
            while not self._stop.is_set():
                if self.engine.failure is not None:
                    self._fail_all(self.engine.failure)
                    return
                draining |= self._take_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                elif draining:
                    return

    def _take_commands(self, block: bool) -> bool:
        draining = False
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._sinks.pop(command[1], None)
                self.engine.abort_request(command[1])
            elif kind == "drain":
                draining = True
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()
        return draining

    def _fail_all(self, reason: str) -> None:
        """The engine cannot run again: every request in flight or waiting ends with the reason."""
        error = RuntimeError(f"generation failed: {reason}")
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        for sink in self._sinks.values():
            sink.put(error)
        self._sinks.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add" and command[5].set_running_or_notify_cancel():
                command[5].set_exception(error)

    def _add(self, request_id, prompt, params, sink: _Sink, accepted: Future) -> None:
        if not accepted.set_running_or_notify_cancel():  # the caller gave up before its turn
            return
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as exc:  # InvalidRequest, or a tokenizer failure on odd input
            accepted.set_exception(exc)
            return
        self._sinks[request_id] = sink
        accepted.set_result(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step must not take the server down with it
            log.exception("engine step failed; aborting the requests in flight")
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
                sink = self._sinks.pop(request_id, None)
                if sink:
                    sink.put(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._stats = self.engine.stats()
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            sink.put(output)
            if output.finished:
                del self._sinks[output.request_id]


class RequestGroup:
    """Engine requests run together and read as one stream, each request known by its index.

    `start()` returns once every request has been accepted and has produced a first output, so a
    request the engine refuses (InvalidRequest) is raised before any response has begun. `close()`
    aborts whatever has not finished; it never awaits, so it is safe in the clean-up of a task that
    is being cancelled because its client has gone. `on_output(index, output)` sees every output
    as it arrives (the server times requests with it)."""

    def __init__(self, engine: AsyncEngine, requests: list[tuple[str, str | list[int], SamplingParams]],
                 on_output: Callable[[int, RequestOutput], None] | None = None):
        self.engine = engine
        self.requests = requests  # (request id, prompt, params)
        self.latest: list[RequestOutput | None] = [None] * len(requests)
        self._on_output = on_output
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._ready: list[tuple[int, RequestOutput]] = []

    def finished(self, index: int) -> bool:
        return self.latest[index] is not None and self.latest[index].finished

    async def start(self) -> None:
        """Submit every request; return when each has its first output. Raises the first refusal."""
        self._tasks = [asyncio.create_task(self._pump(index)) for index in range(len(self.requests))]
        try:
            while any(latest is None for latest in self.latest):
                index, item = await self._queue.get()
                self._ready.append((index, self._take(index, item)))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every request, in arrival order, until all have finished."""
        ready, self._ready = self._ready, []
        for index, output in ready:
            yield index, output
        while not all(self.finished(i) for i in range(len(self.requests))):
            index, item = await self._queue.get()
            yield index, self._take(index, item)

    async def run(self) -> list[RequestOutput]:
        """Wait for every request to finish; their final outputs, in order."""
        async for _ in self.outputs():
            pass
        return list(self.latest)

    def close(self) -> None:
        """Abort the requests that have not finished; their KV blocks are freed at the engine's next step."""
        for task in self._tasks:
            task.cancel()
        for index, (request_id, _, _) in enumerate(self.requests):
            if not self.finished(index):
                self.engine.abort(request_id)

    def _take(self, index: int, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            raise item
        self.latest[index] = item
        if self._on_output is not None:
            self._on_output(index, item)
        return item

    async def _pump(self, index: int) -> None:
        request_id, prompt, params = self.requests[index]
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # InvalidRequest before the first output, or a failed engine step
            self._queue.put_nowait((index, exc))
