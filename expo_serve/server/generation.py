"""The engine requests behind one HTTP request, run together and read as one stream.

An HTTP request becomes one engine request per prompt and per α (an α sweep's values share the
engine's batches). `start()` returns once every engine request has accepted its work and produced
a first output, so a request the engine refuses (InvalidRequest) is still answered with a 400
before any response has begun. `close()` aborts whatever has not finished; it never awaits, so it
is safe in the clean-up of a task that is being cancelled because its client has gone.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine.async_engine import AsyncEngine
from ..engine.request import RequestOutput, SamplingParams
from .alpha import AlphaChoice
from .metrics import RequestTracker


@dataclass
class Job:
    """One engine request: a prompt at one α. `position` orders it among its request's jobs."""

    position: int
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    choice: AlphaChoice
    tracker: RequestTracker
    latest: RequestOutput | None = None
    started: bool = field(default=False, init=False)

    @property
    def finished(self) -> bool:
        return self.latest is not None and self.latest.finished


class Generation:
    def __init__(self, engine: AsyncEngine, jobs: list[Job]):
        self.engine = engine
        self.jobs = jobs
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._ready: list[tuple[int, RequestOutput]] = []

    async def start(self) -> None:
        """Submit every job; return when each has its first output. Raises the first refusal."""
        self._tasks = [asyncio.create_task(self._pump(index, job)) for index, job in enumerate(self.jobs)]
        try:
            while not all(job.started for job in self.jobs):
                index, item = await self._queue.get()
                self._ready.append((index, self._take(index, item)))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Every output of every job, in arrival order, until all have finished."""
        for index, output in self._ready:
            yield self.jobs[index], output
        self._ready = []
        while not all(job.finished for job in self.jobs):
            index, item = await self._queue.get()
            yield self.jobs[index], self._take(index, item)

    async def run(self) -> list[RequestOutput]:
        """Wait for every job to finish; their final outputs, in job order."""
        async for _ in self.outputs():
            pass
        return [job.latest for job in self.jobs]

    def close(self) -> None:
        """Abort the jobs that have not finished; their KV blocks are freed at the engine's next step."""
        for task in self._tasks:
            task.cancel()
        for job in self.jobs:
            if not job.finished:
                self.engine.abort(job.request_id)

    def _take(self, index: int, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            raise item
        job = self.jobs[index]
        job.started = True
        job.latest = item
        job.tracker.observe(item, time.monotonic())
        return item

    async def _pump(self, index: int, job: Job) -> None:
        try:
            async for output in self.engine.generate(job.prompt, job.params, job.request_id):
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # InvalidRequest before the first output, or a failed engine step
            self._queue.put_nowait((index, exc))
