"""Experiments in a running server: the service, its routes, the dashboard, its error envelope, and
the generator of its pairwise battles (two answers to one chat, one per α, in one batch).

Every server has them: experiments come from --experiments FILE or the admin routes
(--admin-key), and are kept in --db (SQLite under EXPO_HOME by default).
"""
from __future__ import annotations

import uuid
from typing import Awaitable, Callable

from fastapi import FastAPI

from ..engine.request import SamplingParams
from .protocol import ChatMessage
from .serving import AlphaChoice, ServingContext, expo_of
from .settings import ServerSettings

GeneratePair = Callable[..., Awaitable[list[str]]]


def build_experiments(settings: ServerSettings):
    """The ExperimentService for these settings (file read and store opened, not yet started)."""
    from ..experiments import ExperimentService, default_db_url, load_experiments_file, open_store

    experiments = load_experiments_file(settings.experiments) if settings.experiments else []
    return ExperimentService(open_store(settings.db or default_db_url()), experiments)


def mount_experiments(app: FastAPI, service, settings: ServerSettings) -> None:
    """Add the experiment, feedback and battle routes and the dashboard to an app made by
    create_app(..., experiments=service)."""
    from ..experiments import ExperimentError, create_dashboard_router, create_experiments_router
    from ..experiments.api import errors, experiment_error_handler

    app.add_exception_handler(ExperimentError, experiment_error_handler)
    app.include_router(create_experiments_router(service, settings.admin_key, pair_generator(app.state.serving)))
    app.include_router(create_dashboard_router(service), responses=errors(404))  # unknown experiment or file


def pair_generator(ctx: ServingContext) -> GeneratePair:
    """The generator the experiments' battles are given (expo_serve.experiments.api.GeneratePair)."""

    async def generate_pair(messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                            temperature: float | None = None) -> list[str]:
        """One text per α, in the order given; sampled like a chat request with these options."""
        prompt = await ctx.chat_prompt([ChatMessage.model_validate(m) for m in messages])
        params = SamplingParams(max_tokens=max_tokens, default_max_tokens=ctx.max_tokens_default,
                                temperature=1.0 if temperature is None else temperature)
        choices = [AlphaChoice(float(alpha)) for alpha in alphas]
        served = await ctx.launch(f"battle-{uuid.uuid4().hex}", [prompt], params, choices, ctx.admit(len(choices)),
                                  expo_of(choices, sweep=True), http=None)
        finals = await served.collect(None)
        return [out.outputs[0].text for out in finals]

    return generate_pair
