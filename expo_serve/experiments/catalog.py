"""The experiments this process serves, as last read from the store, and the admin edits to them.

Every replica keeps this copy in memory so the request path reads no definition from the database;
edits go to the store first and the copy is re-read after, so replicas converge on the store's state
(another replica's edit reaches this copy at the service's next refresh). An edit is planned inside
the store's transaction, on the experiment as last committed by any replica (store.edit_experiment).
Editing the arms, unit, allocation or seed of a running experiment (or restarting a stopped one)
starts a new phase: within a phase a unit never changes arm.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from pydantic import ValidationError

from .config import Experiment, first_error, parse_experiment
from .errors import ExperimentError, not_found
from .records import AllocationRow, CatalogEntry, ExperimentChange, ExperimentRow, PhaseRow
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
        self._reloads_started = 0
        self._installed = 0  # which reload `live` comes from: an older one finishing late never replaces it

    async def reload(self) -> dict[str, LiveExperiment]:
        """Read every experiment, its current phase and allocation from the store."""
        self._reloads_started += 1
        generation = self._reloads_started
        live = {entry.row.key: _live(entry) for entry in await self.store.load_catalog()}
        if generation > self._installed:
            self.live, self._installed = live, generation
        return live

    async def fresh(self, key: str) -> LiveExperiment:
        """One experiment as the store has it now, edits made through other replicas included."""
        entries = await self.store.load_catalog(key)
        if not entries:
            raise not_found("experiment", key, "experiment")
        return _live(entries[0])

    async def apply_file(self, experiments: Iterable[Experiment]) -> None:
        """The --experiments file, applied where it changed since last applied: admin edits made since stand."""
        for experiment in experiments:
            signature = file_signature(experiment)
            await self._edit(experiment.key, lambda current, e=experiment, s=signature:
                             None if current is not None and current.file_signature == s else (e, s))

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
        return await self._edit(experiment.key, lambda current: (
            experiment, current.file_signature if current is not None else None))

    async def set_status(self, key: str, status: str) -> LiveExperiment:
        def target(current: ExperimentRow | None) -> tuple[Experiment, str | None] | None:
            if current is None:
                raise not_found("experiment", key, "experiment")
            if current.status == status:
                return None
            # The stored definition, not this replica's copy, so an edit made through another replica
            # stands; `default` from its column, which making another experiment the default clears.
            definition = parse_experiment(current.definition).model_copy(
                update={"status": status, "default": current.is_default})
            return definition, current.file_signature

        state, _created = await self._edit(key, target)
        return state

    async def _edit(self, key: str, target: Callable[[ExperimentRow | None], tuple[Experiment, str | None] | None]
                    ) -> tuple[LiveExperiment, bool]:
        """Write the definition `target` chooses from the stored row (None: leave it), planned
        inside the store's transaction on the row as committed; re-read the catalog after."""
        planned: list[ExperimentChange] = []

        def plan(current: ExperimentRow | None) -> ExperimentChange | None:
            planned.clear()  # a batch the store retries plans again
            chosen = target(current)
            if chosen is None:
                return None
            planned.append(plan_change(current, *chosen, self._clock()))
            return planned[0]

        entry, created = await self.store.edit_experiment(key, plan)
        if planned:
            change = planned[0]
            log.info("experiment %s: status %s, phase %d%s", key, change.row.status, change.row.phase,
                     " (new phase)" if change.start_phase else "")
        await self.reload()
        # As this edit left it: a later edit through another replica may already be in `live`.
        return _live(entry), created


def plan_change(current: ExperimentRow | None, experiment: Experiment, signature: str | None,
                now: float) -> ExperimentChange:
    """The rows that turn the stored experiment `current` into `experiment`. Changing what decides
    assignment while running, or starting a stopped experiment, begins a new phase."""
    running = experiment.status == "running"
    if current is None:
        phase, start, end = (1 if running else 0), running, False
    else:
        was_running = current.status == "running"
        changed = parse_experiment(current.definition).assignment_signature() != experiment.assignment_signature()
        start = running and (not was_running or changed)
        end = was_running and (start or not running)
        phase = current.phase + (1 if start else 0)
    row = ExperimentRow(experiment.key, experiment.model_dump(mode="json"), experiment.status, phase,
                        experiment.default, signature, now)
    return ExperimentChange(
        row,
        start_phase=PhaseRow(experiment.key, phase, row.definition, now) if start else None,
        initial_allocation=AllocationRow(0, now, experiment.fixed_weights(), "phase start") if start else None,
        end_phase_at=now if end else None, ended_phase=current.phase if end and current else None,
        update_phase_definition=not start and current is not None,
        clear_other_defaults=experiment.default)


def _live(entry: CatalogEntry) -> LiveExperiment:
    row = entry.row
    definition = parse_experiment(row.definition).model_copy(update={"status": row.status, "default": row.is_default})
    return LiveExperiment(definition, row.status, row.phase, row.is_default, row.file_signature, row.updated_at,
                          entry.phase.started_at if entry.phase else None, entry.allocation)


def _parse(data: object) -> Experiment:
    try:
        return parse_experiment(data)
    except ValidationError as exc:
        message, param = first_error(exc)
        raise ExperimentError(f"Invalid experiment: {message}.", param=param, code="invalid_experiment") from None
