"""Which α serves a request, and the `expo` object that says so.

This is the one place experiments (A/B tests of α) plug into serving. A request that names its
own `alpha` (a number, or a list for a sweep) is served as asked and joins no experiment. Any
other request asks the experiments, when the server has them, for an assignment: its arm's α, and
an exposure id whose outcome is reported back when the request ends. Without experiments, such a
request gets the default α, and one that names an `experiment` gets a 404 `experiment_not_found`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from ..api_common import quote
from .errors import APIError, invalid
from .protocol import Expo

log = logging.getLogger("expo_serve.server")


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

    def expo(self) -> Expo:
        return Expo(alpha=self.alpha, experiment=self.experiment, arm=self.arm, exposure_id=self.exposure_id)


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
    return choices[0].expo()


def alpha_header(expo: Expo) -> str:
    values = expo.alpha if isinstance(expo.alpha, list) else [expo.alpha]
    return ",".join(repr(float(a)) for a in values)


@dataclass
class AlphaPolicy:
    default: float
    minimum: float
    maximum: float
    experiments: Experiments | None = None
    _reports: set[asyncio.Task] = field(default_factory=set)

    async def decide(self, requested: float | list[float] | None, experiment: str | None, unit_id: str | None,
                     request_id: str) -> list[AlphaChoice]:
        """The α values a request is served at, in the order its choices are numbered."""
        if requested is not None:
            if experiment is not None:
                raise invalid("Give either 'alpha' or 'experiment', not both: an experiment chooses alpha itself.",
                              param="alpha", code="alpha_with_experiment")
            values = requested if isinstance(requested, list) else [requested]
            return [AlphaChoice(self.check(value)) for value in values]
        if self.experiments is None:
            if experiment is not None:
                raise APIError(404, f"No experiment named {quote(experiment)}: this server runs no experiments.",
                               param="experiment", code="experiment_not_found")
            return [AlphaChoice(self.default)]
        assignment = await self.experiments.assign(experiment, unit_id, request_id)
        if assignment is None:
            return [AlphaChoice(self.default)]
        if not self.minimum <= assignment.alpha <= self.maximum:  # the operator's mistake, not the client's
            raise APIError(500, f"Experiment {assignment.experiment!r} arm {assignment.arm!r} has alpha "
                                f"{assignment.alpha:g}, outside this server's [{self.minimum:g}, {self.maximum:g}].",
                           code="experiment_misconfigured")
        return [AlphaChoice(float(assignment.alpha), assignment.experiment, assignment.arm, assignment.exposure_id)]

    def check(self, alpha: float) -> float:
        if not self.minimum <= alpha <= self.maximum:
            raise invalid(f"alpha must be in [{self.minimum:g}, {self.maximum:g}], got {alpha:g}", param="alpha",
                          code="alpha_out_of_range")
        return alpha

    def report(self, choice: AlphaChoice, outcome: Outcome) -> None:
        """Send an exposure's outcome to its experiment, in the background.

        Not awaited by the caller: a request's clean-up runs even when its task is being cancelled
        (a client gone), where awaiting is not possible."""
        if choice.exposure_id is None or self.experiments is None:
            return
        task = asyncio.get_running_loop().create_task(self._report(choice.exposure_id, outcome))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, exposure_id: str, outcome: Outcome) -> None:
        try:
            await self.experiments.record_outcome(
                exposure_id, latency_s=outcome.latency_s, ttft_s=outcome.ttft_s, output_tokens=outcome.output_tokens,
                finish_reason=outcome.finish_reason, aborted=outcome.aborted)
        except Exception:  # noqa: BLE001 - a lost outcome must not fail a request that was served
            log.exception("could not record the outcome of exposure %s", exposure_id)

    async def flush(self) -> None:
        """Wait for outcomes still being recorded (at shutdown)."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
