"""Live A/B testing of α: experiments, assignment, durable exposure logs, honest statistics.

Imports nothing from the engine, model, delta or kernels: the server resolves an arm to an α
through `ExperimentService.assign` and then submits an ordinary request.
"""
from .config import Arm, Experiment, load_experiments_file
from .errors import ExperimentError
from .service import Assignment, ExperimentService
from .store import ExperimentStore, default_db_url, open_store

__all__ = ["Arm", "Assignment", "Experiment", "ExperimentError", "ExperimentService", "ExperimentStore",
           "default_db_url", "load_experiments_file", "open_store", "create_experiments_router",
           "create_dashboard_router"]


def __getattr__(name: str):
    # The routers pull in FastAPI; keep `import expo_serve.experiments` light for the CLI.
    if name == "create_experiments_router":
        from .api import create_experiments_router
        return create_experiments_router
    if name == "create_dashboard_router":
        from .dashboard import create_dashboard_router
        return create_dashboard_router
    raise AttributeError(name)
