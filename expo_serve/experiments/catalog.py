"""The experiments this process serves, as last read from the store, and the admin edits to them.

Every replica keeps this copy in memory so the request path reads no definition from the database;
edits go to the store first and the copy is re-read after, so replicas converge on the store's state.
Editing the arms, unit, allocation or seed of a running experiment (or restarting a stopped one)
starts a new phase: within a phase a unit never changes arm.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from pydantic import ValidationError

from .config import Experiment, first_error, parse_experiment
from .errors import ExperimentError, not_found
from .records import AllocationRow, ExperimentChange, ExperimentRow, PhaseRow
from .store import ExperimentStore

log = logging.getLogger("expo_serve.experiments")


@dataclass
class LiveExperiment:
    definition: Experiment
    status: str
    phase: int
    is_default: bool
    file_signature: str | None
    updated_at: float
    phase_started_at: float | None = None
    allocation: AllocationRow | None = None

    def weights(self) -> dict[str, float]:
        return self.allocation.weights if self.allocation else self.definition.fixed_weights()

    def view(self) -> dict:
        """What the admin routes show of an experiment."""
        view = self.definition.model_dump(mode="json")
        view.update({"status": self.status, "default": self.is_default, "phase": self.phase,
                     "phase_started_at": self.phase_started_at, "updated_at": self.updated_at,
                     "weights": self.weights() if self.phase > 0 else None,
                     "weights_version": self.allocation.version if self.allocation else None})
        return view


def file_signature(experiment: Experiment) -> str:
    return hashlib.sha256(experiment.model_dump_json().encode()).hexdigest()[:16]


class Catalog:
    def __init__(self, store: ExperimentStore, clock: Callable[[], float]):
        self.store = store
        self.live: dict[str, LiveExperiment] = {}
        self._clock = clock
        self._admin_lock = asyncio.Lock()

    async def reload(self) -> None:
        """Read every experiment, its current phase and allocation from the store."""
        live = {}
        for row in await self.store.load_experiments():
            definition = parse_experiment(row.definition).model_copy(update={"status": row.status, "default": row.is_default})
            state = LiveExperiment(definition, row.status, row.phase, row.is_default, row.file_signature, row.updated_at)
            if row.phase > 0:
                phase = await self.store.load_phase(row.key, row.phase)
                state.phase_started_at = phase.started_at if phase else None
                allocations = await self.store.load_allocations(row.key, row.phase)
                state.allocation = allocations[-1] if allocations else None
            live[row.key] = state
        self.live = live

    async def apply_file(self, experiments: Iterable[Experiment]) -> None:
        """The --experiments file, applied where it changed since last applied: admin edits made since stand."""
        for experiment in experiments:
            signature = file_signature(experiment)
            current = self.live.get(experiment.key)
            if current is None or current.file_signature != signature:
                await self.apply(experiment, signature)

    def require(self, key: str) -> LiveExperiment:
        state = self.live.get(key)
        if state is None:
            raise not_found("experiment", key, "experiment")
        return state

    def resolve(self, experiment_key: str | None) -> LiveExperiment | None:
        """The experiment a request joins: the named one (must be running) or the running default."""
        if experiment_key is None:
            return next((s for s in self.live.values() if s.is_default and s.status == "running"), None)
        if not isinstance(experiment_key, str):
            raise ExperimentError("`experiment` must be a string.", param="experiment", code="invalid_type")
        state = self.require(experiment_key)
        if state.status != "running":
            raise ExperimentError(f"Experiment {experiment_key!r} is {state.status}, not running.",
                                  param="experiment", code="experiment_not_running")
        return state

    async def upsert(self, data: object) -> tuple[LiveExperiment, bool]:
        """Create or edit from a definition (dict or Experiment); returns (state, created)."""
        experiment = data if isinstance(data, Experiment) else _parse(data)
        current = self.live.get(experiment.key)
        return await self.apply(experiment, current.file_signature if current else None), current is None

    async def set_status(self, key: str, status: str) -> LiveExperiment:
        state = self.require(key)
        if state.status == status:
            return state
        return await self.apply(state.definition.model_copy(update={"status": status}), state.file_signature)

    async def apply(self, experiment: Experiment, signature: str | None) -> LiveExperiment:
        async with self._admin_lock:
            await self.reload()
            now = self._clock()
            current = self.live.get(experiment.key)
            running = experiment.status == "running"
            if current is None:
                phase, start, end = (1 if running else 0), running, False
            else:
                was_running = current.status == "running"
                changed = current.definition.assignment_signature() != experiment.assignment_signature()
                start = running and (not was_running or changed)
                end = was_running and (start or not running)
                phase = current.phase + (1 if start else 0)
            row = ExperimentRow(experiment.key, experiment.model_dump(mode="json"), experiment.status, phase,
                                experiment.default, signature, now)
            change = ExperimentChange(
                row,
                start_phase=PhaseRow(experiment.key, phase, row.definition, now) if start else None,
                initial_allocation=AllocationRow(0, now, experiment.fixed_weights(), "phase start") if start else None,
                end_phase_at=now if end else None, ended_phase=current.phase if end and current else None,
                update_phase_definition=not start and current is not None,
                clear_other_defaults=experiment.default)
            await self.store.apply_change(change)
            log.info("experiment %s: status %s, phase %d%s", experiment.key, experiment.status, phase,
                     " (new phase)" if start else "")
            await self.reload()
            return self.live[experiment.key]


def _parse(data: object) -> Experiment:
    try:
        return parse_experiment(data)
    except ValidationError as exc:
        message, param = first_error(exc)
        raise ExperimentError(f"Invalid experiment: {message}.", param=param, code="invalid_experiment") from None
