"""create_app: the OpenAI-compatible FastAPI app on a running AsyncEngine.

With `shutdown_engine`, the app stops the engine once uvicorn has drained its requests (the
runner's case: uvicorn ends a process stopped by SIGTERM right after the app's shutdown).

Experiments (A/B tests of α) plug in through `experiments` (alpha.Experiments, started and closed
with the app; None: a request that names no α gets the default one). Their routes and error
handler are added to the returned app (`app.include_router`, `app.add_exception_handler`): the API
key covers every /v1 path, added before or after; battle.pair_generator(app.state.serving) is the
generator their pairwise battles need.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine.async_engine import AsyncEngine
from .admission import AdmissionGate
from .alpha import AlphaPolicy, Experiments
from .auth import ApiKeyMiddleware
from .errors import install_error_handlers
from .limits import BodyLimitMiddleware
from .metrics import ServerMetrics
from .routes import router
from .serving import ServingContext
from .settings import ServerSettings

DESCRIPTION = ("OpenAI-compatible serving of ExPO models, θ_sft + (1+α)·Δ, with α chosen per request: "
               "pass `alpha` (a number, or a list of up to 8 for a sweep) in the request body.")


def create_app(settings: ServerSettings, engine: AsyncEngine, *, experiments: Experiments | None = None,
               shutdown_engine: bool = False) -> FastAPI:
    name = settings.served_model_name
    ctx = ServingContext(
        engine=engine,
        model_name=name,
        policy=AlphaPolicy(settings.alpha_default, settings.alpha_min, settings.alpha_max, experiments),
        gate=AdmissionGate(settings.max_num_seqs, settings.max_queue),
        metrics=ServerMetrics(engine.stats, name),
        stream_grace_s=settings.shutdown_timeout,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if experiments is not None:
            await experiments.start()
        yield
        ctx.gate.close()
        await ctx.policy.flush()
        if experiments is not None:
            await experiments.close()
        if shutdown_engine:
            await run_in_threadpool(engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(title="expo-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.serving = ctx
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    # The last one added runs first: the key is checked before a large body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this server answers those errors with 400."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
