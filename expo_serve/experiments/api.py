"""HTTP routes of the experiments subsystem, as a FastAPI APIRouter factory.

Every failure answers in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, 400
for invalid input, never FastAPI's 422. Bodies are pydantic models (strings checked for valid
UTF-8, unknown fields refused), so /openapi.json documents them; EnvelopeRoute turns their
validation errors into the envelope, so the routes need no app-wide handler. Mutating admin routes
need the admin key in `X-Admin-Key` (or `Authorization: Bearer`), checked before the body is
validated; without an admin key configured they are disabled (403).
"""
from __future__ import annotations

import hmac
import json
from typing import Awaitable, Callable, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..api_common import (ErrorResponse, Flag, Integer, Number, RequestBody, describe, invalid_text, quote,
                          unparsable_body)
from .config import METRIC_NAME, Experiment
from .battles import OUTCOMES
from .errors import ExperimentError
from .outcomes import MAX_COMMENT
from .service import ExperimentService

MAX_BATTLE_TOKENS = 4096
ROLES = ("system", "user", "assistant")


class GeneratePair(Protocol):
    """Injected by the server: two generations of one chat, one per α, in one batch, same order."""

    def __call__(self, messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> Awaitable[list[str]]: ...


# -- request bodies --------------------------------------------------------------------------------
class Body(RequestBody):
    model_config = ConfigDict(extra="forbid")


class ExperimentDefinition(RequestBody, Experiment):
    """An experiment as the admin route takes it (config.Experiment, with its strings checked)."""


class Feedback(Body):
    exposure_id: str = Field(min_length=1, description="the `expo.exposure_id` of the response rated")
    name: str = Field(pattern=METRIC_NAME, description="the metric: thumbs, rating, or one the experiment declares")
    value: Number | Flag = Field(description="a number (thumbs: 0 or 1, or a boolean)")
    comment: str | None = Field(None, max_length=MAX_COMMENT)


class BattleMessage(BaseModel):
    role: Literal[ROLES]
    content: str


class Battle(Body):
    messages: list[BattleMessage] = Field(min_length=1)
    max_tokens: Integer | None = Field(None, ge=1, le=MAX_BATTLE_TOKENS)
    temperature: Number | None = Field(None, ge=0, le=2)
    user: str | None = Field(None, description="the voter, as the A/B assignment unit")


class Vote(Body):
    winner: Literal[OUTCOMES]


_WHY = {400: "Invalid request", 401: "Missing or wrong admin key", 403: "Admin routes are disabled (no --admin-key)",
        404: "No such experiment, phase, exposure or battle", 501: "This server has no model to generate battles",
        503: "Queue full (see Retry-After) or shutting down"}


def errors(*statuses: int) -> dict:
    """The `responses` of a route that can fail with these statuses (OpenAI's envelope)."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


# -- routing ---------------------------------------------------------------------------------------
class EnvelopeRoute(APIRoute):
    """Turns ExperimentError, validation errors and unparsable bodies into their status and
    envelope without needing an app-wide handler."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except ExperimentError as exc:
                error = exc
            except RequestValidationError as exc:
                message, param, code = describe(exc.errors()[0])
                error = ExperimentError(message, param=param, code=code)
            except HTTPException as exc:
                if exc.status_code != 400 or exc.__cause__ is None:
                    raise
                message, code = unparsable_body(exc)
                error = ExperimentError(message, code=code)
            return JSONResponse(error.envelope(), status_code=error.status)

        return route


async def experiment_error_handler(_request: Request, exc: ExperimentError) -> JSONResponse:
    """For the server's app-wide handlers, should it raise ExperimentError elsewhere."""
    return JSONResponse(exc.envelope(), status_code=exc.status)


async def json_object(request: Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    """A body read by hand (the standalone app's per-request routes), checked as the models check theirs."""
    try:
        data = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ExperimentError("The request body must be valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ExperimentError("The request body must be a JSON object.", code="invalid_json")
    where = invalid_text(data)
    if where is not None:
        raise ExperimentError(f"{quote(where) if where else 'A key'} is not valid UTF-8 text (a lone surrogate).",
                              param=where or None, code="invalid_utf8")
    if allowed:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ExperimentError(f"Unknown field {quote(unknown[0])}.", param=unknown[0], code="unknown_field")
    for name in sorted(required):
        if name not in data:
            raise ExperimentError(f"'{name}' is required.", param=name, code="missing_field")
    return data


def admin_guard(admin_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if admin_key is None:
            raise ExperimentError("Admin routes are disabled: start the server with --admin-key.", status=403,
                                  code="admin_disabled")
        given = request.headers.get("x-admin-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if given is None or not hmac.compare_digest(given.encode(), admin_key.encode()):
            raise ExperimentError("A valid admin key is required (X-Admin-Key header).", status=401,
                                  code="invalid_admin_key")
    return check


def create_experiments_router(service: ExperimentService, admin_key: str | None,
                              generate_pair: GeneratePair | None = None) -> APIRouter:
    router = APIRouter(route_class=EnvelopeRoute)
    admin = [Depends(admin_guard(admin_key))]  # a dependency runs before the body is validated

    @router.get("/v1/experiments")
    async def list_experiments():
        return {"object": "list", "data": service.list_experiments()}

    @router.post("/v1/experiments", dependencies=admin,
                 responses={201: {"description": "Created"}, **errors(400, 401, 403)})
    async def upsert_experiment(definition: ExperimentDefinition):
        view, created = await service.upsert_experiment(definition.model_dump(exclude_unset=True))
        return JSONResponse(view, status_code=201 if created else 200)

    @router.get("/v1/experiments/{key}", responses=errors(404))
    async def get_experiment(key: str):
        return service.get_experiment(key)

    @router.post("/v1/experiments/{key}/stop", dependencies=admin, responses=errors(401, 403, 404))
    async def stop_experiment(key: str):
        return await service.set_status(key, "stopped")

    @router.post("/v1/experiments/{key}/start", dependencies=admin, responses=errors(401, 403, 404))
    async def start_experiment(key: str):
        return await service.set_status(key, "running")

    @router.get("/v1/experiments/{key}/results", responses=errors(400, 404))
    async def results(key: str, phase: int | None = None, timeline: bool = False):
        return await service.results(key, phase, timeline=timeline)

    @router.post("/v1/feedback", responses=errors(400, 404))
    async def feedback(body: Feedback):
        return await service.feedback(body.exposure_id, body.name, body.value, body.comment)

    @router.get("/v1/exposures/{exposure_id}", dependencies=admin, responses=errors(401, 403, 404))
    async def exposure(exposure_id: str):
        return await service.exposure(exposure_id)

    @router.post("/v1/experiments/{key}/battles", responses=errors(400, 404, 501, 503))
    async def create_battle(key: str, body: Battle):
        if generate_pair is None:
            raise ExperimentError("Battles need a model: this server has no generator for them.", status=501,
                                  code="battles_unavailable")
        options = body.model_dump(include={"max_tokens", "temperature"}, exclude_none=True)
        messages = [message.model_dump() for message in body.messages]
        return await service.create_battle(key, messages, generate_pair, unit_id=body.user, **options)

    @router.post("/v1/battles/{battle_id}/vote", responses=errors(400, 404))
    async def vote(battle_id: str, body: Vote):
        return await service.vote(battle_id, body.winner)

    return router
