"""What chat and completions share: from a validated body to running engine requests, and back.

`ServingContext.begin` checks the model, decides α (the experiments seam), admits the request
through the bounded queue, and starts one engine request per prompt and per α. The `Served` it
returns numbers the choices, computes usage, and cleans up exactly once: abort what is
unfinished, leave the queue, report outcomes to experiments.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from ..api_common import quote
from ..engine.async_engine import AsyncEngine
from ..engine.request import RequestOutput, SamplingParams
from .admission import AdmissionGate, Ticket
from .alpha import AlphaChoice, AlphaPolicy, Outcome, alpha_header, expo_of
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import APIError
from .generation import Generation, Job
from .logprobs import TokenText
from .metrics import ServerMetrics
from .protocol import Expo, GenerationRequest, Usage

UNIT_HEADER = "x-expo-unit"


@dataclass
class ServingContext:
    engine: AsyncEngine
    model_name: str
    policy: AlphaPolicy
    gate: AdmissionGate
    metrics: ServerMetrics
    stream_grace_s: float = 30.0  # how long a shutdown lets running streams finish
    max_tokens_default: int | None = None  # output tokens of a request that gives no max_tokens
    token_text: TokenText = field(init=False)

    def __post_init__(self):
        self.token_text = TokenText(self.engine.tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.engine.engine.loaded.config.vocab_size)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {quote(model)} does not exist: this server serves {self.model_name!r}.",
                           param="model", code="model_not_found")

    def admit(self, sequences: int) -> Ticket:
        try:
            self.gate.check_size(sequences)
            return self.gate.admit(sequences)
        except APIError as exc:
            self.metrics.reject(exc.code or "invalid")
            raise

    async def begin(self, http: Request, body: GenerationRequest, prompts: list[str | list[int]],
                    params: SamplingParams, id_prefix: str) -> "Served":
        """Start serving a request's `prompts`: admission, then α (the experiments seam), then the
        engine. Raises APIError or InvalidRequest before any response has been sent."""
        arrival = time.monotonic()
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        sweep = isinstance(body.alpha, list)
        ticket = self.admit(len(prompts) * (len(body.alpha) if sweep else 1) * params.n)
        try:  # after admission, so that a refused request is never counted as an experiment's exposure
            choices = await self.policy.decide(body.alpha, body.experiment, body.user or http.headers.get(UNIT_HEADER),
                                               request_id)
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
        positions = [(p, a) for p in range(len(prompts)) for a in range(len(choices))]
        jobs = [Job(i, f"{request_id}-{i}", prompts[p], dataclasses.replace(params, alpha=choices[a].alpha), choices[a],
                    self.metrics.tracker(choices[a].arm, arrival))
                for i, (p, a) in enumerate(positions)]
        served = Served(request_id, int(time.time()), Generation(self.engine, jobs), choices, params.n, expo, ticket,
                        self.policy)
        await served.guarded(http, served.generation.start())
        return served


@dataclass
class Served:
    request_id: str
    created: int
    generation: Generation
    choices: list[AlphaChoice]
    n: int
    expo: Expo
    _ticket: Ticket
    _policy: AlphaPolicy
    _done: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"x-expo-alpha": alpha_header(self.expo), "x-request-id": self.request_id}

    @property
    def num_choices(self) -> int:
        return len(self.generation.jobs) * self.n

    def choice_index(self, job: Job, completion_index: int) -> int:
        """Choices are numbered prompt by prompt, then α by α, then the n samples of each."""
        return job.position * self.n + completion_index

    async def collect(self, http: Request | None) -> list[RequestOutput]:
        """Every job's final output, in job order. With `http`, raises ClientDisconnected if the
        client goes away first, once everything unfinished has been aborted."""
        finals = await self.guarded(http, self.generation.run())
        self.finish(aborted=False)
        return finals

    async def guarded(self, http: Request | None, work):
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

    def alpha_of(self, index: int) -> float:
        return self.generation.jobs[index // self.n].choice.alpha

    def usage(self, finals: list[RequestOutput]) -> Usage:
        """Prompt tokens count once per prompt, however many α values and samples it was served at."""
        per_prompt = len(self.choices)
        prompt = sum(len(out.prompt_token_ids) for out in finals[::per_prompt])
        completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def finish(self, aborted: bool, failed: bool = False) -> None:
        """Abort what is unfinished, leave the queue, report outcomes. Never awaits; runs once."""
        if self._done:
            return
        self._done = True
        self.generation.close()
        self._ticket.release()
        by_exposure: dict[str, list[Job]] = {}
        for job in self.generation.jobs:
            if job.choice.exposure_id is not None:
                by_exposure.setdefault(job.choice.exposure_id, []).append(job)
        for jobs in by_exposure.values():
            self._policy.report(jobs[0].choice, _combined(jobs, aborted, failed))


def _combined(jobs: list[Job], aborted: bool, failed: bool) -> Outcome:
    """One exposure's outcome when it ran as several engine requests (a list of prompts)."""
    outcomes = [job.tracker.outcome(aborted) for job in jobs]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return Outcome(latency_s=max(o.latency_s for o in outcomes), ttft_s=min(ttfts) if ttfts else None,
                   output_tokens=sum(o.output_tokens for o in outcomes),
                   finish_reason="error" if failed else outcomes[0].finish_reason, aborted=aborted)


def json_response(body: BaseModel, headers: dict[str, str] | None = None, status_code: int = 200) -> Response:
    """Serialized by pydantic directly (FastAPI would validate the model a second time)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json", headers=headers)
