"""From a validated request body to running engine requests, and their outputs back.

`ServingContext.begin` admits a request through the bounded queue (middleware.AdmissionGate),
decides which α serve it (the one place experiments plug in), and starts one engine request per
prompt and per α (engine RequestGroup), racing the client's disconnect. The `Served` it returns
numbers the choices, counts usage, times every engine request for the metrics, and cleans up
exactly once: abort what is unfinished, leave the queue, report the outcome to the experiment.
A streamed answer goes out through `event_stream`, server-sent events in OpenAI's framing.

Which α: a request that names its own `alpha` (a number, or a list for a sweep) is served as asked
and joins no experiment; any other asks the experiments, when the server has them, for an
assignment (its arm's α, and an exposure id whose outcome is reported when the request ends);
without one it gets the engine's default α. The engine alone judges an α (AlphaRange.check): an
experiment's arm outside the engine's range is the operator's mistake, answered with a 500.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..api_common import quote
from ..engine.async_engine import AsyncEngine, RequestGroup
from ..engine.request import InvalidRequest, RequestOutput, SamplingParams
from .errors import APIError, ClientDisconnected, from_exception, invalid, shutting_down
from .middleware import AdmissionGate, Ticket
from .metrics import ServerMetrics
from .protocol import ChatMessage, Expo, GenerationRequest, Usage

log = logging.getLogger("expo_serve.server")

UNIT_HEADER = "x-expo-unit"
T = TypeVar("T")


# -- the experiments seam --------------------------------------------------------------------------

class Assignment(Protocol):
    """What an experiment decided for one request (expo_serve.experiments.Assignment fits)."""

    experiment: str
    arm: str
    alpha: float
    exposure_id: str


class Experiments(Protocol):
    """The experiments façade the server needs (expo_serve.experiments.ExperimentService fits).

    `assign` may raise an exception carrying its own HTTP status and envelope; the app that wires
    experiments in registers a handler for it (app.add_exception_handler)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def assign(self, experiment_key: str | None, unit_id: str | None, request_id: str) -> Assignment | None: ...

    async def record_outcome(self, exposure_id: str, *, latency_s: float | None, ttft_s: float | None,
                             output_tokens: int | None, finish_reason: str | None, aborted: bool) -> None: ...


@dataclass(frozen=True)
class AlphaChoice:
    """One α a request is served at, and where it came from."""

    alpha: float
    experiment: str | None = None
    arm: str | None = None
    exposure_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What an exposure's experiment learns when its request ends."""

    latency_s: float | None
    ttft_s: float | None
    output_tokens: int
    finish_reason: str | None
    aborted: bool


def expo_of(choices: list[AlphaChoice], sweep: bool) -> Expo:
    """The response's `expo` object: the choice's, or for a sweep the list of its α values."""
    if sweep:
        return Expo(alpha=[c.alpha for c in choices])
    c = choices[0]
    return Expo(alpha=c.alpha, experiment=c.experiment, arm=c.arm, exposure_id=c.exposure_id)


class OutcomeReports:
    """Outcomes sent to the experiments in the background: a request's clean-up runs even when its
    task is being cancelled (a client gone), where awaiting is not possible."""

    def __init__(self, experiments: Experiments | None):
        self.experiments = experiments
        self._tasks: set[asyncio.Task] = set()

    def send(self, exposure_id: str, outcome: Outcome) -> None:
        if self.experiments is None:
            return
        task = asyncio.get_running_loop().create_task(self._send(exposure_id, outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, exposure_id: str, outcome: Outcome) -> None:
        try:
            await self.experiments.record_outcome(exposure_id, **dataclasses.asdict(outcome))
        except Exception:  # noqa: BLE001 - a lost outcome must not fail a request that was served
            log.exception("could not record the outcome of exposure %s", exposure_id)

    async def flush(self) -> None:
        """Wait for outcomes still being recorded (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# -- timing one engine request -----------------------------------------------------------------------

class RequestTracker:
    """Times one engine request as its cumulative outputs arrive, and feeds the metrics (which
    include the time a request spends queued) and its experiment's outcome."""

    def __init__(self, metrics: ServerMetrics, arm: str | None, arrival: float):
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        self.output_tokens = 0
        self._labels = (metrics.model_name, arm or "")
        self._metrics = metrics
        self._seen: dict[int, tuple[int, float]] = {}  # choice index -> (tokens seen, when the last came)
        self._prompt_counted = False

    def observe(self, output: RequestOutput, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        m = self._metrics
        if not self._prompt_counted:
            m.prompt_tokens.labels(*self._labels).inc(len(output.prompt_token_ids))
            self._prompt_counted = True
        itl = m.itl.labels(*self._labels)
        for choice in output.outputs:
            seen, last = self._seen.get(choice.index, (0, self.arrival))
            new = len(choice.token_ids) - seen
            if new <= 0:
                continue
            if self.first_token_at is None:
                self.first_token_at = now
                m.ttft.labels(*self._labels).observe(now - self.arrival)
            elif seen:
                # One step may bring several tokens of a sequence; spread the gap over them.
                for _ in range(new):
                    itl.observe((now - last) / new)
            self._seen[choice.index] = (seen + new, now)
            self.output_tokens += new
            m.generation_tokens.labels(*self._labels).inc(new)
        if output.finished and self.finished_at is None:
            self.finished_at = now
            self.finish_reason = output.outputs[0].finish_reason if output.outputs else None
            m.e2e.labels(*self._labels).observe(now - self.arrival)
            for choice in output.outputs:
                m.finished.labels(*self._labels, choice.finish_reason or "unknown").inc()

    def outcome(self, aborted: bool) -> Outcome:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return Outcome(latency_s=end - self.arrival,
                       ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
                       output_tokens=self.output_tokens, finish_reason=None if aborted else self.finish_reason,
                       aborted=aborted)


# -- serving ---------------------------------------------------------------------------------------

def serving(request: Request) -> "ServingContext":
    """The app's ServingContext, for a route."""
    return request.app.state.serving


@dataclass
class ServingContext:
    engine: AsyncEngine
    model_name: str
    gate: AdmissionGate
    metrics: ServerMetrics
    experiments: Experiments | None = None
    stream_grace_s: float = 30.0  # how long a shutdown lets running streams finish
    max_tokens_default: int | None = None  # output tokens of a request that gives no max_tokens
    reports: OutcomeReports = field(init=False)

    def __post_init__(self):
        self.reports = OutcomeReports(self.experiments)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @cached_property
    def token_text(self) -> Callable[[int], str]:
        """Token id -> the text it decodes to on its own (special tokens included), cached:
        logprobs name the same tokens over and over."""
        tokenizer = self.tokenizer
        return lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {quote(model)} does not exist: this server serves {self.model_name!r}.",
                           param="model", code="model_not_found")

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids through the model's chat template; one that cannot render these
        messages is a 400. (The one place a chat becomes a prompt.)"""
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise invalid("This model has no chat template; use /v1/completions.", param="messages",
                          code="no_chat_template")
        plain = [message.template_form() for message in messages]

        def render() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - templates raise what they like (jinja2, ValueError …)
                # The template's words may hold the messages' text: quoted.
                raise invalid(f"The chat template cannot format these messages: {quote(str(exc), 200)}",
                              param="messages", code="chat_template_error") from None
            return list(tokenizer.encode(text, add_special_tokens=False))

        return await run_in_threadpool(render)

    def admit(self, sequences: int) -> Ticket:
        try:
            return self.gate.admit(sequences)
        except APIError as exc:
            self.metrics.reject(exc.code or "invalid")
            raise

    async def choose_alpha(self, body: GenerationRequest, unit_id: str | None, request_id: str) -> list[AlphaChoice]:
        """The α values a request is served at, in the order its choices are numbered."""
        if body.alpha is not None:
            if body.experiment is not None:
                raise invalid("Give either 'alpha' or 'experiment', not both: an experiment chooses alpha itself.",
                              param="alpha", code="alpha_with_experiment")
            return [AlphaChoice(a) for a in (body.alpha if isinstance(body.alpha, list) else [body.alpha])]
        default = [AlphaChoice(self.engine.alpha_range.default)]
        if self.experiments is None:
            if body.experiment is not None:
                raise APIError(404, f"No experiment named {quote(body.experiment)}: this server runs no experiments.",
                               param="experiment", code="experiment_not_found")
            return default
        assignment = await self.experiments.assign(body.experiment, unit_id, request_id)
        if assignment is None:
            return default
        return [AlphaChoice(float(assignment.alpha), assignment.experiment, assignment.arm, assignment.exposure_id)]

    async def begin(self, http: Request, body: GenerationRequest, prompts: list[str | list[int]],
                    params: SamplingParams, id_prefix: str) -> "Served":
        """Start serving a request's `prompts`: admission, then α, then the engine. Raises APIError or
        InvalidRequest before any response has been sent."""
        arrival = time.monotonic()
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        sweep = isinstance(body.alpha, list)
        ticket = self.admit(len(prompts) * (len(body.alpha) if sweep else 1) * params.n)
        try:  # after admission, so that a refused request is never counted as an experiment's exposure
            choices = await self.choose_alpha(body, body.user or http.headers.get(UNIT_HEADER), request_id)
        except BaseException:
            ticket.release()
            raise
        return await self.launch(request_id, prompts, params, choices, ticket, expo_of(choices, sweep), http, arrival)

    async def launch(self, request_id: str, prompts: list[str | list[int]], params: SamplingParams,
                     choices: list[AlphaChoice], ticket: Ticket, expo: Expo, http: Request | None,
                     arrival: float | None = None) -> "Served":
        """One engine request per prompt and α; returns once each has its first output. With `http`,
        a client that leaves meanwhile (a queued request waits here) aborts them. Latencies count
        from `arrival` (default: now)."""
        arrival = time.monotonic() if arrival is None else arrival
        jobs = [(prompt, choice) for prompt in prompts for choice in choices]
        trackers = [RequestTracker(self.metrics, choice.arm, arrival) for _, choice in jobs]
        group = RequestGroup(self.engine, [(f"{request_id}-{i}", prompt, dataclasses.replace(params, alpha=choice.alpha))
                                           for i, (prompt, choice) in enumerate(jobs)],
                             on_output=lambda index, output: trackers[index].observe(output))
        served = Served(self, request_id, int(time.time()), group, [choice for _, choice in jobs], trackers,
                        len(choices), params.n, expo, ticket)
        try:
            await served.guarded(http, group.start())
        except InvalidRequest as exc:
            if exc.param == "alpha" and choices[0].experiment is not None:  # the operator's mistake
                raise APIError(500, f"Experiment {choices[0].experiment!r} arm {choices[0].arm!r} has alpha "
                                    f"{choices[0].alpha:g}, which this server refuses: {exc}",
                               code="experiment_misconfigured") from None
            raise
        return served


@dataclass
class Served:
    """A request being served: its engine requests (one per prompt and α, in that order) as one group."""

    ctx: ServingContext
    request_id: str
    created: int
    group: RequestGroup
    choices: list[AlphaChoice]  # per engine request
    trackers: list[RequestTracker]  # per engine request
    alphas_per_prompt: int
    n: int
    expo: Expo
    _ticket: Ticket
    _done: bool = False

    @property
    def headers(self) -> dict[str, str]:
        values = self.expo.alpha if isinstance(self.expo.alpha, list) else [self.expo.alpha]
        return {"x-expo-alpha": ",".join(repr(float(a)) for a in values), "x-request-id": self.request_id}

    @property
    def num_choices(self) -> int:
        return len(self.choices) * self.n

    def choice_index(self, job: int, completion_index: int) -> int:
        """Choices are numbered prompt by prompt, then α by α, then the n samples of each."""
        return job * self.n + completion_index

    def alpha_of(self, choice_index: int) -> float:
        return self.choices[choice_index // self.n].alpha

    async def collect(self, http: Request | None) -> list[RequestOutput]:
        """Every engine request's final output, in order. With `http`, raises ClientDisconnected if
        the client goes away first, once everything unfinished has been aborted."""
        finals = await self.guarded(http, self.group.run())
        self.finish(aborted=False)
        return finals

    async def guarded(self, http: Request | None, work: Awaitable[T]) -> T:
        """Await `work` (racing the client's disconnect when `http` is given); on a disconnect or
        any failure, abort what is unfinished and report the outcome before re-raising."""
        try:
            return await (unless_disconnected(http, work) if http is not None else work)
        except ClientDisconnected:
            self.finish(aborted=True)
            raise
        except BaseException:
            self.finish(aborted=False, failed=True)
            raise

    def usage(self, finals: list[RequestOutput]) -> Usage:
        """Prompt tokens count once per prompt, however many α values and samples it was served at."""
        prompt = sum(len(out.prompt_token_ids) for out in finals[::self.alphas_per_prompt])
        completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def finish(self, aborted: bool, failed: bool = False) -> None:
        """Abort what is unfinished, leave the queue, report outcomes. Never awaits; runs once."""
        if self._done:
            return
        self._done = True
        self.group.close()
        self._ticket.release()
        by_exposure: dict[str, list[RequestTracker]] = {}
        for choice, tracker in zip(self.choices, self.trackers):
            if choice.exposure_id is not None:
                by_exposure.setdefault(choice.exposure_id, []).append(tracker)
        for exposure_id, trackers in by_exposure.items():
            self.ctx.reports.send(exposure_id, _combined(trackers, aborted, failed))


def _combined(trackers: list[RequestTracker], aborted: bool, failed: bool) -> Outcome:
    """One exposure's outcome when it ran as several engine requests (a list of prompts)."""
    outcomes = [tracker.outcome(aborted) for tracker in trackers]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return Outcome(latency_s=max(o.latency_s for o in outcomes), ttft_s=min(ttfts) if ttfts else None,
                   output_tokens=sum(o.output_tokens for o in outcomes),
                   finish_reason="error" if failed else outcomes[0].finish_reason, aborted=aborted)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, unless the client hangs up first: then it is cancelled (its clean-up aborts the engine
    requests, freeing their KV blocks at the engine's next step) and ClientDisconnected is raised.
    Once the body has been read, the next ASGI message is `http.disconnect`, sent when the client
    goes away (or after the response is complete)."""
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


# -- server-sent events ----------------------------------------------------------------------------
# `data: {chunk}` events, then `data: [DONE]`. A failure after the stream has begun cannot change the
# status any more, so it is sent as one `data: {"error": …}` event (OpenAI's envelope), followed by
# `[DONE]`. A client that disconnects cancels the stream; the clean-up (`on_close`) then aborts its
# engine requests. On shutdown a running stream goes on until the drain's deadline (middleware.Drain,
# found on the app's state); then it ends between two chunks with an error event
# (`server_shutting_down`) and `[DONE]`, logged on one line. (`grace_s` is the library's own last
# resort, should its shutdown signal come first.)

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
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # SSE ends lines at CR and LF only, but many clients split lines as str.splitlines does (httpx's
    # aiter_lines, for one), also at NEL, LS and PS, which JSON leaves raw. They can occur only inside
    # strings, where their escapes mean the same: a sampled token that decodes to one then cannot cut
    # an event in two.
    return text.translate(_LINE_BREAKS_ESCAPED)


_LINE_BREAKS_ESCAPED = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


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


def json_response(body: BaseModel, headers: dict[str, str] | None = None, status_code: int = 200) -> Response:
    """Serialized by pydantic directly (FastAPI would validate the model a second time)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json", headers=headers)
