"""HTTP routes of the experiments subsystem, as a FastAPI APIRouter factory.

Every failure answers in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, 400
for invalid input (bodies and query strings are parsed here, so FastAPI never produces a 422).
Mutating admin routes need the admin key in `X-Admin-Key` (or `Authorization: Bearer`); without
an admin key configured they are disabled (403).
"""
from __future__ import annotations

import hmac
import json
from typing import Awaitable, Callable, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from .errors import ExperimentError
from .service import ExperimentService

MAX_BATTLE_TOKENS = 4096
ROLES = ("system", "user", "assistant")


class GeneratePair(Protocol):
    """Injected by the server: two generations of one chat, one per α, in one batch, same order."""

    def __call__(self, messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> Awaitable[list[str]]: ...


class EnvelopeRoute(APIRoute):
    """Turns ExperimentError into its status and envelope without needing an app-wide handler."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except ExperimentError as exc:
                return JSONResponse(exc.envelope(), status_code=exc.status)

        return route


async def experiment_error_handler(_request: Request, exc: ExperimentError) -> JSONResponse:
    """For the server's app-wide handlers, should it raise ExperimentError elsewhere."""
    return JSONResponse(exc.envelope(), status_code=exc.status)


async def json_object(request: Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    try:
        data = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ExperimentError("The request body must be valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ExperimentError("The request body must be a JSON object.", code="invalid_json")
    if allowed:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ExperimentError(f"Unknown field `{unknown[0]}`.", param=unknown[0], code="unknown_field")
    for name in sorted(required):
        if name not in data:
            raise ExperimentError(f"`{name}` is required.", param=name, code="missing_field")
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


def _parse_phase(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ExperimentError("`phase` must be an integer.", param="phase", code="invalid_value") from None


def _flag(text: str | None) -> bool:
    return text is not None and text.lower() in ("1", "true", "yes")


def _validate_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ExperimentError("`messages` must be a non-empty list.", param="messages", code="invalid_value")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ExperimentError(f"`messages[{i}]` must have a role ({', '.join(ROLES)}) and string content.",
                                  param=f"messages.{i}", code="invalid_value")
    return messages


def create_experiments_router(service: ExperimentService, admin_key: str | None,
                              generate_pair: GeneratePair | None = None) -> APIRouter:
    router = APIRouter(route_class=EnvelopeRoute)
    require_admin = admin_guard(admin_key)

    @router.get("/v1/experiments")
    async def list_experiments():
        return {"object": "list", "data": service.list_experiments()}

    @router.post("/v1/experiments")
    async def upsert_experiment(request: Request):
        require_admin(request)
        data = await json_object(request, allowed=set())
        view, created = await service.upsert_experiment(data)
        return JSONResponse(view, status_code=201 if created else 200)

    @router.get("/v1/experiments/{key}")
    async def get_experiment(key: str):
        return service.get_experiment(key)

    @router.post("/v1/experiments/{key}/stop")
    async def stop_experiment(key: str, request: Request):
        require_admin(request)
        return await service.set_status(key, "stopped")

    @router.post("/v1/experiments/{key}/start")
    async def start_experiment(key: str, request: Request):
        require_admin(request)
        return await service.set_status(key, "running")

    @router.get("/v1/experiments/{key}/results")
    async def results(key: str, request: Request):
        query = request.query_params
        return await service.results(key, _parse_phase(query.get("phase")), timeline=_flag(query.get("timeline")))

    @router.post("/v1/feedback")
    async def feedback(request: Request):
        data = await json_object(request, {"exposure_id", "name", "value", "comment"}, {"exposure_id", "name", "value"})
        return await service.feedback(data["exposure_id"], data["name"], data["value"], data.get("comment"))

    @router.get("/v1/exposures/{exposure_id}")
    async def exposure(exposure_id: str, request: Request):
        require_admin(request)
        return await service.exposure(exposure_id)

    @router.post("/v1/experiments/{key}/battles")
    async def create_battle(key: str, request: Request):
        data = await json_object(request, {"messages", "max_tokens", "temperature", "user"}, {"messages"})
        if generate_pair is None:
            raise ExperimentError("Battles need a model: this server has no generator for them.", status=501,
                                  code="battles_unavailable")
        messages = _validate_messages(data["messages"])
        options = {}
        max_tokens = data.get("max_tokens")
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_BATTLE_TOKENS:
                raise ExperimentError(f"`max_tokens` must be an integer from 1 to {MAX_BATTLE_TOKENS}.",
                                      param="max_tokens", code="invalid_value")
            options["max_tokens"] = max_tokens
        temperature = data.get("temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
                raise ExperimentError("`temperature` must be a number from 0 to 2.", param="temperature",
                                      code="invalid_value")
            options["temperature"] = float(temperature)
        user = data.get("user")
        if user is not None and not isinstance(user, str):
            raise ExperimentError("`user` must be a string.", param="user", code="invalid_value")
        return await service.create_battle(key, messages, generate_pair, unit_id=user, **options)

    @router.post("/v1/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        data = await json_object(request, {"winner"}, {"winner"})
        return await service.vote(battle_id, data["winner"])

    return router
