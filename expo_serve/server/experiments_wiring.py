"""Experiments in a running server: the service, its routes, the dashboard, its error envelope.

Every server has them: experiments come from --experiments FILE or the admin routes
(--admin-key), and are kept in --db (SQLite under EXPO_HOME by default).
"""
from __future__ import annotations

from fastapi import FastAPI

from .battle import pair_generator
from .settings import ServerSettings


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
