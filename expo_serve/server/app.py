"""create_app: the OpenAI-compatible FastAPI app on a running AsyncEngine.

With `shutdown_engine`, the app stops the engine once uvicorn has drained its requests (the
runner's case). `app.state.drain` (middleware.Drain) is how a shutdown drains: the runner begins it on
SIGTERM or SIGINT and stops uvicorn once it is over.

Middleware, outermost first: the drain (503 to new requests while draining), the API key (checked
before the body is read, on every path auth.is_open does not name), the body limit (before any
parsing), the last resort for unexpected exceptions (a 500 that keeps the connection), then the
routes.

Experiments (A/B tests of α) plug in through `experiments` (serving.Experiments, started and
closed with the app; None: a request that names no α gets the default one). Their routes and error
handler are added to the returned app (`app.include_router`, `app.add_exception_handler`): the API
key covers every path but the open ones (middleware.OPEN), added before or after;
experiments_wiring.pair_generator(app.state.serving) is the generator their pairwise battles need.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine.async_engine import AsyncEngine
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import (ApiKeyMiddleware, BodyLimitMiddleware, Drain, DrainMiddleware,
                         UnexpectedErrorMiddleware)
from .protocol import SERVER_BOUND
from . import generation, routes
from .serving import AdmissionGate, Experiments, ServingContext
from .settings import ServerSettings

DESCRIPTION = ("OpenAI-compatible serving of ExPO models, θ_sft + (1+α)·Δ, with α chosen per request: "
               "pass `alpha` (a number, or a list of up to 8 for a sweep) in the request body.")


def create_app(settings: ServerSettings, engine: AsyncEngine, *, experiments: Experiments | None = None,
               shutdown_engine: bool = False) -> FastAPI:
    name = settings.served_model_name
    ctx = ServingContext(
        engine=engine,
        model_name=name,
        gate=AdmissionGate(settings.max_num_seqs, settings.max_queue),
        metrics=ServerMetrics(engine.stats, name),
        experiments=experiments,
        stream_grace_s=settings.shutdown_timeout,
        max_tokens_default=settings.max_tokens_default,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if experiments is not None:
            await experiments.start()
        yield
        ctx.gate.close()
        await ctx.reports.flush()
        if experiments is not None:
            await experiments.close()
        if shutdown_engine:
            await run_in_threadpool(engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(title="expo-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.serving = ctx
    app.state.settings = settings
    app.state.drain = drain = Drain(ctx.gate, settings.shutdown_timeout)
    install_error_handlers(app)
    app.include_router(generation.router)
    app.include_router(routes.router)
    # The last one added runs first: the key is checked before a large body is read.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key,
                           metrics_require_key=settings.metrics_require_key)
    app.add_middleware(DrainMiddleware, drain=drain)
    alpha = engine.alpha_range
    _document(app, {"token_id": {"maximum": engine.vocab_size - 1}, "alpha": {"minimum": alpha.min, "maximum": alpha.max}})
    return app


def _document(app: FastAPI, bounds: dict[str, dict]) -> None:
    """/openapi.json as this server answers: no 422 (FastAPI documents one for every body; these
    errors are 400 here), and the bounds only the running server knows (protocol.SERVER_BOUND)."""
    generate = app.openapi

    def fill(node) -> None:
        if isinstance(node, dict):
            node.update(bounds.get(node.pop(SERVER_BOUND, None), {}))
            for value in node.values():
                fill(value)
        elif isinstance(node, list):
            for value in node:
                fill(value)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            fill(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
