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
    #          400 missing_unit with param "user", 400 invalid_unit): answer with e.status and e.envelope().
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

Within a phase a unit never changes arm: the arm comes from GrowthBook's v2 hash of the unit
under the phase's seed (so replicas agree without shared state) and is pinned by a sticky record
written with the first exposure; later exposures read the record. Editing the arms, unit,
allocation or seed of a running experiment (or restarting a stopped one) starts a new phase.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from pydantic import ValidationError

from . import bandit
from .assign import choose_arm
from .config import IMPLICIT_METRICS, METRIC_NAME, Experiment, first_error, parse_experiment
from .errors import ExperimentError, not_found
from .results import TIMELINE_POINTS, build_results, primary_summaries
from .store import AllocationRow, BattleRow, ExperimentChange, ExperimentRow, ExperimentStore, PhaseRow

log = logging.getLogger("expo_serve.experiments")

MAX_UNIT_ID = 256
MAX_COMMENT = 4000
BATTLE_OUTCOMES = ("left", "right", "tie", "both_bad")


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    alpha: float
    phase: int
    probability: float   # the probability this unit had of landing in `arm` when first assigned
    exposure_id: str
    unit_id: str
    first_exposure: bool

    def expo(self) -> dict:
        """The fields of the response's `expo` object that come from the experiment."""
        return {"alpha": self.alpha, "experiment": self.experiment, "arm": self.arm, "exposure_id": self.exposure_id}


@dataclass
class _Live:
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


def file_signature(experiment: Experiment) -> str:
    return hashlib.sha256(experiment.model_dump_json().encode()).hexdigest()[:16]


class ExperimentService:
    def __init__(self, store: ExperimentStore, experiments: Iterable[Experiment] = (), *,
                 clock: Callable[[], float] = time.time, refresh_interval_s: float = 5.0):
        self.store = store
        self._file_experiments = list(experiments)
        self._clock = clock
        self._refresh_interval_s = refresh_interval_s
        self._live: dict[str, _Live] = {}
        self._admin_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self, *, background: bool = True) -> None:
        await self.store.start()
        await self.reload()
        for experiment in self._file_experiments:
            signature = file_signature(experiment)
            current = self._live.get(experiment.key)
            if current is not None and current.file_signature == signature:
                continue  # unchanged in the file since last applied: admin edits made since stand
            await self._apply(experiment, signature)
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
        live = {}
        for row in await self.store.load_experiments():
            definition = parse_experiment(row.definition).model_copy(update={"status": row.status, "default": row.is_default})
            state = _Live(definition, row.status, row.phase, row.is_default, row.file_signature, row.updated_at)
            if row.phase > 0:
                phase = await self.store.load_phase(row.key, row.phase)
                state.phase_started_at = phase.started_at if phase else None
                allocations = await self.store.load_allocations(row.key, row.phase)
                state.allocation = allocations[-1] if allocations else None
            live[row.key] = state
        self._live = live

    # --- admin --------------------------------------------------------------------------------
    def list_experiments(self) -> list[dict]:
        return [self._view(state) for state in self._live.values()]

    def get_experiment(self, key: str) -> dict:
        return self._view(self._require(key))

    async def upsert_experiment(self, data: object) -> tuple[dict, bool]:
        """Create or edit from a definition (dict or Experiment); returns (view, created)."""
        experiment = data if isinstance(data, Experiment) else self._parse(data)
        created = experiment.key not in self._live
        current = self._live.get(experiment.key)
        state = await self._apply(experiment, current.file_signature if current else None)
        return self._view(state), created

    async def set_status(self, key: str, status: str) -> dict:
        state = self._require(key)
        if state.status == status:
            return self._view(state)
        return self._view(await self._apply(state.definition.model_copy(update={"status": status}), state.file_signature))

    @staticmethod
    def _parse(data: object) -> Experiment:
        try:
            return parse_experiment(data)
        except ValidationError as exc:
            message, param = first_error(exc)
            raise ExperimentError(f"Invalid experiment: {message}.", param=param, code="invalid_experiment") from None

    async def _apply(self, experiment: Experiment, signature: str | None) -> _Live:
        async with self._admin_lock:
            await self.reload()
            now = self._clock()
            current = self._live.get(experiment.key)
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
            return self._live[experiment.key]

    def _view(self, state: _Live) -> dict:
        view = state.definition.model_dump(mode="json")
        view.update({"status": state.status, "default": state.is_default, "phase": state.phase,
                     "phase_started_at": state.phase_started_at, "updated_at": state.updated_at,
                     "weights": state.weights() if state.phase > 0 else None,
                     "weights_version": state.allocation.version if state.allocation else None})
        return view

    def _require(self, key: str) -> _Live:
        state = self._live.get(key)
        if state is None:
            raise not_found("experiment", key, "experiment")
        return state

    # --- the request path ---------------------------------------------------------------------
    def resolve(self, experiment_key: str | None) -> _Live | None:
        """The experiment a request joins: the named one (must be running) or the running default."""
        if experiment_key is None:
            return next((s for s in self._live.values() if s.is_default and s.status == "running"), None)
        if not isinstance(experiment_key, str):
            raise ExperimentError("`experiment` must be a string.", param="experiment", code="invalid_type")
        state = self._require(experiment_key)
        if state.status != "running":
            raise ExperimentError(f"Experiment {experiment_key!r} is {state.status}, not running.",
                                  param="experiment", code="experiment_not_running")
        return state

    async def assign(self, experiment_key: str | None, unit_id: str | None, request_id: str) -> Assignment | None:
        """Choose the arm, log the exposure durably, and return it; None when no experiment applies."""
        state = self.resolve(experiment_key)
        if state is None:
            return None
        experiment = state.definition
        if experiment.unit == "request":
            unit = request_id
        elif unit_id is None or unit_id == "":
            if experiment_key is None:
                return None  # the default experiment only enrols requests that name their user
            raise ExperimentError(f"Experiment {experiment.key!r} assigns per user: pass `user` or the "
                                  "X-ExPO-Unit header.", param="user", code="missing_unit")
        else:
            unit = unit_id
        if not isinstance(unit, str) or len(unit) > MAX_UNIT_ID:
            raise ExperimentError(f"The unit id must be a string of at most {MAX_UNIT_ID} characters.",
                                  param="user", code="invalid_unit")
        weights = state.weights()
        version = state.allocation.version if state.allocation else 0
        seed = f"{experiment.seed or experiment.key}:{state.phase}"
        arm = choose_arm(seed, unit, [a.name for a in experiment.arms], weights)
        exposure_id = "exp_" + uuid.uuid4().hex
        stored = await self.store.assign(experiment.key, state.phase, unit, arm, weights[arm], version, exposure_id,
                                         request_id, {a.name: a.alpha for a in experiment.arms}, self._clock())
        alpha = experiment.arm(stored.arm).alpha
        return Assignment(experiment.key, stored.arm, alpha, state.phase, stored.probability, exposure_id, unit,
                          stored.first_exposure)

    async def record_outcome(self, exposure_id: str, *, latency_s: float | None, ttft_s: float | None,
                             output_tokens: int | None, finish_reason: str | None, aborted: bool) -> None:
        """The implicit signals of one served exposure (durable when this returns; repeat to replace)."""
        for name, value in (("latency_s", latency_s), ("ttft_s", ttft_s), ("output_tokens", output_tokens)):
            if value is not None and (not _is_number(value) or value < 0):
                raise ExperimentError(f"`{name}` must be a finite number ≥ 0.", param=name, code="invalid_value")
        if finish_reason is not None and (not isinstance(finish_reason, str) or len(finish_reason) > 32):
            raise ExperimentError("`finish_reason` must be a short string.", param="finish_reason", code="invalid_value")
        await self.store.record_outcome(exposure_id, None if latency_s is None else float(latency_s),
                                        None if ttft_s is None else float(ttft_s),
                                        None if output_tokens is None else int(output_tokens),
                                        finish_reason, bool(aborted), self._clock())

    async def feedback(self, exposure_id: str, name: str, value: float | bool, comment: str | None = None) -> dict:
        """Record (or replace) one named feedback value for an exposure; durable when this returns."""
        import re

        if not isinstance(exposure_id, str) or not exposure_id:
            raise ExperimentError("`exposure_id` must be a non-empty string.", param="exposure_id", code="invalid_value")
        if not isinstance(name, str) or not re.match(METRIC_NAME, name):
            raise ExperimentError("`name` must be a metric name (a letter, then letters, digits, '_', '.', '-').",
                                  param="name", code="invalid_value")
        if name in IMPLICIT_METRICS:
            raise ExperimentError(f"`{name}` is recorded by the server itself and cannot be sent as feedback.",
                                  param="name", code="reserved_metric")
        if isinstance(value, bool):
            value = int(value)
        if not _is_number(value):
            raise ExperimentError("`value` must be a finite number (thumbs: 0 or 1).", param="value", code="invalid_value")
        if comment is not None and not isinstance(comment, str):
            raise ExperimentError("`comment` must be a string.", param="comment", code="invalid_value")
        if comment is not None and len(comment) > MAX_COMMENT:
            raise ExperimentError(f"`comment` must be at most {MAX_COMMENT} characters.",
                                  param="comment", code="invalid_value")
        value = float(value)

        def check(key: str, phase: int) -> None:
            state = self._live.get(key)
            spec = state.definition.metric_spec(name) if state else None
            if spec is not None and spec.kind == "binary" and value not in (0.0, 1.0):
                raise ExperimentError(f"`{name}` is a binary metric: `value` must be 0 or 1.", param="value",
                                      code="invalid_value")

        target = await self.store.upsert_feedback(exposure_id, name, value, comment, self._clock(), check)
        return {"exposure_id": exposure_id, "name": name, "value": value, "experiment": target.key,
                "phase": target.phase, "arm": target.arm, "replaced": target.replaced}

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
        state = self.resolve(key)
        arms = state.definition.arms
        rng = secrets.SystemRandom()
        left, right = rng.sample(arms, 2)
        texts = await generate_pair(messages, [left.alpha, right.alpha], **options)
        if not isinstance(texts, (list, tuple)) or len(texts) != 2 or not all(isinstance(t, str) for t in texts):
            raise ExperimentError("The battle generator did not return two texts.", status=500, code="generation_failed")
        battle = BattleRow("bat_" + uuid.uuid4().hex, key, state.phase, left.name, right.name, left.alpha, right.alpha)
        await self.store.create_battle(battle, unit_id, self._clock())
        return {"id": battle.battle_id, "object": "battle", "experiment": key,
                "left": {"content": texts[0]}, "right": {"content": texts[1]}}

    async def vote(self, battle_id: str, winner: str) -> dict:
        if winner not in BATTLE_OUTCOMES:
            raise ExperimentError(f"`winner` must be one of {', '.join(BATTLE_OUTCOMES)}.", param="winner",
                                  code="invalid_value")
        row = await self.store.vote(battle_id, winner, self._clock())
        # Revealed only after the vote, so the voter could not know the α.
        return {"id": battle_id, "object": "battle.vote", "winner": winner, "experiment": row.key,
                "left": {"arm": row.left_arm, "alpha": row.left_alpha},
                "right": {"arm": row.right_arm, "alpha": row.right_alpha}}

    # --- allocation and results -----------------------------------------------------------------
    async def update_allocations(self) -> None:
        """Recompute Thompson weights where the schedule says so, and log them (one row per slot)."""
        now = self._clock()
        for key, state in list(self._live.items()):
            experiment = state.definition
            if state.status != "running" or experiment.allocation != "thompson":
                continue
            slot = bandit.schedule_slot(now, experiment.thompson.update_every_s)
            if state.allocation is not None and state.allocation.version >= slot:
                continue
            data = await self.store.phase_data(key, state.phase, experiment.primary_metric, state.phase_started_at,
                                               TIMELINE_POINTS)
            weights, reason = bandit.thompson_weights(experiment, primary_summaries(experiment, data))
            if await self.store.add_allocation(key, state.phase, AllocationRow(slot, now, weights, reason)):
                log.info("experiment %s phase %d: weights %s (%s)", key, state.phase,
                         {k: round(v, 4) for k, v in weights.items()}, reason)
            allocations = await self.store.load_allocations(key, state.phase)
            state.allocation = allocations[-1] if allocations else state.allocation

    async def results(self, key: str, phase: int | None = None, *, timeline: bool = False) -> dict:
        state = self._require(key)
        phase = state.phase if phase is None else phase
        if state.phase == 0:
            raise ExperimentError(f"Experiment {key!r} has not started, so it has no results yet.",
                                  code="experiment_not_started", param="phase")
        if not isinstance(phase, int) or not 1 <= phase <= state.phase:
            raise ExperimentError(f"Experiment {key!r} has phases 1 to {state.phase}.", status=404,
                                  code="phase_not_found", param="phase")
        phase_row = await self.store.load_phase(key, phase)
        if phase == state.phase:
            experiment, weights = state.definition, state.weights()
        else:
            experiment = parse_experiment(phase_row.definition)
            allocations = await self.store.load_allocations(key, phase)
            weights = allocations[-1].weights if allocations else None
        now = self._clock()
        end = phase_row.ended_at if phase_row and phase_row.ended_at is not None else now
        started = phase_row.started_at if phase_row else None
        data = await self.store.phase_data(key, phase, experiment.primary_metric, started, TIMELINE_POINTS)
        status = state.status if phase == state.phase else "ended"
        return build_results(experiment, phase=phase, status=status, data=data, now=end, phase_started_at=started,
                             current_weights=weights, timeline=timeline)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
