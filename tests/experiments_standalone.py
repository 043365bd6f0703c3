"""The experiments routes and dashboard without a model: `python tests/experiments_standalone.py`.

For the tests (durability under SIGKILL, the dashboard in a browser, the live run's stand-in)
and simulations. Besides the routes the server mounts, it
offers what the server does per request as two routes: `POST /v1/assign` (choose the arm and log
the exposure, as a chat request would) and `POST /v1/outcomes` (the implicit signals).
"""
from __future__ import annotations

import argparse
import sys
import uuid
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import APIRouter, FastAPI, Request

from expo_serve.errors import ExpoError
from expo_serve.experiments import ExperimentService, load_experiments_file, open_store
from expo_serve.experiments.api import EnvelopeRoute, GeneratePair, create_experiments_router, json_object
from expo_serve.experiments.dashboard import create_dashboard_router
from expo_serve.experiments.errors import ExperimentError


async def placeholder_pair(messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                           temperature: float | None = None) -> list[str]:
    """Battle texts without a model: exercises the battle flow only (the texts say so)."""
    return [f"(placeholder answer {i + 1}: no model is loaded)" for i in range(len(alphas))]


def _request_routes(service: ExperimentService) -> APIRouter:
    router = APIRouter(route_class=EnvelopeRoute)

    @router.post("/v1/assign")
    async def assign(request: Request):
        data = await json_object(request, {"experiment", "user", "request_id"})
        user = data.get("user") or request.headers.get("x-expo-unit")
        request_id = data.get("request_id") or "req_" + uuid.uuid4().hex
        if not isinstance(request_id, str):
            raise ExperimentError("`request_id` must be a string.", param="request_id", code="invalid_value")
        assignment = await service.assign(data.get("experiment"), user, request_id)
        if assignment is None:
            return {"expo": None}
        return {"expo": assignment.expo(), "phase": assignment.phase, "probability": assignment.probability,
                "unit_id": assignment.unit_id, "first_exposure": assignment.first_exposure}

    @router.post("/v1/outcomes")
    async def outcome(request: Request):
        data = await json_object(request, {"exposure_id", "latency_s", "ttft_s", "output_tokens", "finish_reason",
                                           "aborted"}, {"exposure_id"})
        await service.record_outcome(data["exposure_id"], latency_s=data.get("latency_s"), ttft_s=data.get("ttft_s"),
                                     output_tokens=data.get("output_tokens"), finish_reason=data.get("finish_reason"),
                                     aborted=bool(data.get("aborted", False)))
        return {"exposure_id": data["exposure_id"], "recorded": True}

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    return router


def create_app(service: ExperimentService, admin_key: str | None,
               generate_pair: GeneratePair | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="expo-serve experiments", lifespan=lifespan)
    app.include_router(create_experiments_router(service, admin_key, generate_pair))
    app.include_router(create_dashboard_router(service))
    app.include_router(_request_routes(service))
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/experiments_standalone.py", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None, help="sqlite:///path or postgresql://… (default: under EXPO_HOME)")
    parser.add_argument("--experiments", default=None, help="YAML or JSON file with a list of experiments")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--admin-key", default=None)
    parser.add_argument("--refresh-interval", type=float, default=5.0, help="seconds between scheduler ticks")
    parser.add_argument("--placeholder-battles", action="store_true",
                        help="answer battles with placeholder texts (no model), to exercise the flow")
    args = parser.parse_args(argv)
    try:
        experiments = load_experiments_file(args.experiments) if args.experiments else []
        service = ExperimentService(open_store(args.db), experiments, refresh_interval_s=args.refresh_interval)
    except ExpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    app = create_app(service, args.admin_key, placeholder_pair if args.placeholder_battles else None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
