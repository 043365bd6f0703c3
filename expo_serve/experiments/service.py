"""ExperimentService: the one object the server talks to. It never sees the engine or the model.

Life cycle (the server's lifespan)::

    store = open_store(db_url)                       # sqlite:///… (default under EXPO_HOME) or postgresql://…
    service = ExperimentService(store, load_experiments_file(path) if path else [])
    await service.start()                            # opens the store, applies the file, starts the scheduler
    ...
    await service.close()                            # commits what is queued, stops the scheduler

Per chat/completions request (only when the request did NOT set `alpha` itself: a request that
sets `alpha` is served as asked, joins no experiment and is not counted)::

    a = await service.assign(body.get("experiment"), body.get("user") or headers.get("x-expo-unit"), request_id)
    # -> None: no experiment applies (no key given and no running default experiment, or the default
    #          experiment is per-user and the request names no user): serve at the default α.
    # -> Assignment: serve at a.alpha; put a.expo() in the response's `expo` object; the exposure
    #          is already durable (committed) when assign returns.
    # raises ExperimentError (status 404 experiment_not_found, 400 experiment_not_running,
    #          400 missing_unit with param "user", 400 invalid_unit, 409 experiment_changing when edits
    #          through other replicas kept moving its phase): answer with e.status and e.envelope().
    ...generate...
    await service.record_outcome(a.exposure_id, latency_s=..., ttft_s=..., output_tokens=...,
                                 finish_reason=..., aborted=client_disconnected)

Exact signatures (all coroutines resolve after the write has committed):

    ExperimentService(store: ExperimentStore, experiments: Iterable[Experiment] = (), *,
                      clock: Callable[[], float] = time.time, refresh_interval_s: float = 5.0)
    await start(*, background: bool = True) / await close()        (or `async with service:`)
    await assign(experiment_key: str | None, unit_id: str | None, request_id: str) -> Assignment | None
    await record_outcome(exposure_id, *, latency_s: float | None, ttft_s: float | None,
                         output_tokens: int | None, finish_reason: str | None, aborted: bool) -> None
    await feedback(exposure_id: str, name: str, value: float | bool, comment: str | None = None) -> dict
    await create_battle(key, messages, generate_pair, *, unit_id=None, max_tokens=None, temperature=None) -> dict
    await vote(battle_id: str, winner: "left" | "right" | "tie" | "both_bad") -> dict
    await results(key: str, phase: int | None = None, *, timeline: bool = False) -> dict
    list_experiments() -> list[dict]; get_experiment(key) -> dict
    await upsert_experiment(definition: dict | Experiment) -> (view: dict, created: bool)
    await set_status(key, "running" | "stopped" | "draft") -> dict
    await exposure(exposure_id) -> dict        (exposure, outcome and feedback, for support)
    await update_allocations() -> None         (the scheduler's tick; Thompson weights)

Every refusal is an ExperimentError (errors.py) with .status, .code, .param and .envelope().

Routes: `create_experiments_router(service, admin_key, generate_pair)` (api.py) and
`create_dashboard_router(service)` (dashboard.py). Battles need two generations of one prompt in
one batch; the server injects `generate_pair` (see api.GeneratePair):

    async def generate_pair(messages: list[dict], alphas: list[float], *, max_tokens: int | None = None,
                            temperature: float | None = None) -> list[str]   # one text per α, same order

Each job lives in its own module, this class only wires them to one store, clock and catalog:
catalog.py (definitions, phases, admin edits), assign.py (arm and exposure), outcomes.py (implicit
signals and feedback), arena.py (battles), allocation.py (the bandit loop), results.py.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterable

from . import allocation, arena, outcomes
from .assign import Assignment, log_exposure, unit_of
from .catalog import Catalog, LiveExperiment
from .config import Experiment
from .errors import ExperimentError, PhaseMoved, not_found
from .results import read_results
from .store import ExperimentStore

__all__ = ["Assignment", "ExperimentService"]

log = logging.getLogger("expo_serve.experiments")
_PHASE_ATTEMPTS = 3  # an exposure re-planned after each edit that lands under it; more means edits thrash


class ExperimentService:
    def __init__(self, store: ExperimentStore, experiments: Iterable[Experiment] = (), *,
                 clock: Callable[[], float] = time.time, refresh_interval_s: float = 5.0):
        self.store = store
        self._file_experiments = list(experiments)
        self._clock = clock
        self._refresh_interval_s = refresh_interval_s
        self._catalog = Catalog(store, clock)
        self._task: asyncio.Task | None = None

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self, *, background: bool = True) -> None:
        await self.store.start()
        await self.reload()
        await self._catalog.apply_file(self._file_experiments)
        await self.update_allocations()
        if background:
            self._task = asyncio.create_task(self._maintain(), name="expo-experiments-scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.store.close()

    async def __aenter__(self) -> "ExperimentService":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            try:
                await self.reload()  # edits made through another replica
                await self.update_allocations()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the scheduler alive; the next tick retries
                log.exception("experiments scheduler tick failed")

    async def reload(self) -> None:
        """Read every experiment, its current phase and allocation from the store."""
        await self._catalog.reload()

    # --- admin --------------------------------------------------------------------------------
    def list_experiments(self) -> list[dict]:
        return [state.view() for state in self._catalog.live.values()]

    def get_experiment(self, key: str) -> dict:
        return self._catalog.require(key).view()

    async def upsert_experiment(self, data: object) -> tuple[dict, bool]:
        """Create or edit from a definition (dict or Experiment); returns (view, created)."""
        state, created = await self._catalog.upsert(data)
        return state.view(), created

    async def set_status(self, key: str, status: str) -> dict:
        return (await self._catalog.set_status(key, status)).view()

    # --- the request path ---------------------------------------------------------------------
    def resolve(self, experiment_key: str | None) -> LiveExperiment | None:
        """The experiment a request joins: the named one (must be running) or the running default."""
        return self._catalog.resolve(experiment_key)

    async def assign(self, experiment_key: str | None, unit_id: str | None, request_id: str) -> Assignment | None:
        """Choose the arm, log the exposure durably, and return it; None when no experiment applies."""
        for _attempt in range(_PHASE_ATTEMPTS):
            state = self.resolve(experiment_key)
            unit = None if state is None else unit_of(state, unit_id, request_id, named=experiment_key is not None)
            if unit is None:
                return None
            try:
                return await log_exposure(self.store, state, unit, request_id, self._clock())
            except PhaseMoved:
                await self.reload()  # edited through another replica since this copy was read
        raise ExperimentError(f"Experiment {state.definition.key!r} is being edited; send the request again.",
                              status=409, code="experiment_changing", param="experiment")

    async def record_outcome(self, exposure_id: str, *, latency_s: float | None, ttft_s: float | None,
                             output_tokens: int | None, finish_reason: str | None, aborted: bool) -> None:
        """The implicit signals of one served exposure (durable when this returns; repeat to replace)."""
        await outcomes.record_outcome(self.store, exposure_id, latency_s=latency_s, ttft_s=ttft_s,
                                      output_tokens=output_tokens, finish_reason=finish_reason, aborted=aborted,
                                      now=self._clock())

    async def feedback(self, exposure_id: str, name: str, value: float | bool, comment: str | None = None) -> dict:
        """Record (or replace) one named feedback value for an exposure; durable when this returns."""
        return await outcomes.record_feedback(self.store, self._metric_kind, exposure_id, name, value, comment,
                                              self._clock())

    def _metric_kind(self, key: str, name: str) -> str | None:
        state = self._catalog.live.get(key)
        spec = state.definition.metric_spec(name) if state else None
        return spec.kind if spec else None

    async def exposure(self, exposure_id: str) -> dict:
        found = await self.store.exposure(exposure_id)
        if found is None:
            raise not_found("exposure", exposure_id, "exposure_id")
        return found

    # --- battles ------------------------------------------------------------------------------
    async def create_battle(self, key: str, messages: list[dict],
                            generate_pair: Callable[..., Awaitable[list[str]]], *, unit_id: str | None = None,
                            **options) -> dict:
        """One prompt at two distinct arms (a uniformly random pair), left/right at random, α hidden."""
        return await arena.create_battle(self.store, self.resolve(key), messages, generate_pair, unit_id=unit_id,
                                         clock=self._clock, **options)

    async def vote(self, battle_id: str, winner: str) -> dict:
        return await arena.vote(self.store, battle_id, winner, self._clock())

    # --- allocation and results -----------------------------------------------------------------
    async def update_allocations(self) -> None:
        """Recompute Thompson weights where the schedule says so, and log them (one row per slot)."""
        await allocation.update_allocations(self.store, self._catalog.live, self._clock())

    async def results(self, key: str, phase: int | None = None, *, timeline: bool = False) -> dict:
        # The experiment as stored now, not this replica's copy: after an edit through another
        # replica, every replica reports the same phase at once.
        return await read_results(self.store, await self._catalog.fresh(key), phase, self._clock(), timeline=timeline)
