"""The durable state of experiments, and `open_store(url)`: SQLite (WAL) for one process, PostgreSQL
for several replicas, one SQLAlchemy Core code path for both (dialect settings: database.py).

Every write goes through one batched writer thread and its awaitable resolves only after the
commit, so what the server acknowledges is durable. Reads run on worker threads over pooled
connections and see committed data.

Several replicas share one PostgreSQL: an edit of an experiment is planned inside its own
transaction under a per-experiment lock (edit_experiment), and an exposure is written only into
the phase the database says is running (assign), so no replica's stale copy of the definitions
can collide on a phase number or log into an ended phase.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ExpoError
from ..paths import expo_home
from . import database
from .errors import ExperimentError, PhaseMoved, not_found
from .phase_query import load_allocations, phase_data
from .records import (AllocationRow, BattleRow, CatalogEntry, ExperimentChange, ExperimentRow, FeedbackTarget,
                      PhaseData, PhaseRow, StoredAssignment)
from .schema import allocations, assignments, battle_votes, battles, experiments, exposures, feedback, outcomes, phases
from .writer import BatchWriter, OperationRefused

__all__ = ["AllocationRow", "BattleRow", "CatalogEntry", "ExperimentChange", "ExperimentRow", "ExperimentStore",
           "FeedbackTarget", "PhaseData", "PhaseRow", "StoredAssignment", "default_db_url", "open_store"]


def default_db_url() -> str:
    return f"sqlite:///{expo_home() / 'experiments.db'}"


def open_store(url: str | None = None) -> "ExperimentStore":
    """`sqlite:///path` (default: under EXPO_HOME) or `postgresql://…` (psycopg 3 required)."""
    url = url or default_db_url()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ExpoError("A sqlite URL needs a path: sqlite:///path/to/experiments.db.")
        return ExperimentStore(url, database.sqlite_engine(Path(path)), path)
    if url.startswith(("postgresql://", "postgres://")):
        return ExperimentStore(url, database.postgres_engine(url),
                               sa.engine.make_url(url).render_as_string(hide_password=True))
    raise ExpoError(f"Unsupported --db URL {url!r}: use sqlite:///path or postgresql://user@host/dbname.")


class ExperimentStore:
    """Durable state of experiments. Writes resolve after commit; reads see committed data."""

    def __init__(self, url: str, engine: sa.engine.Engine, where: str):
        self.url = url
        self._engine = engine
        self._where = where  # how error messages name the database
        self._writer = BatchWriter(self)
        self._started = False

    # --- life cycle and plumbing --------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._writer.start()
        self._started = True
        await self._writer.submit(database.create_schema)

    async def close(self) -> None:
        if not self._started:
            return
        await asyncio.to_thread(self._writer.close)
        self._engine.dispose()
        self._started = False

    def connect_writer(self) -> Connection:
        return database.connect(self._engine, self._where, writer=True)

    is_retryable = staticmethod(database.is_retryable)
    is_disconnect = staticmethod(database.is_disconnect)

    async def _write(self, op: Callable[[Connection], Any]) -> Any:
        return await self._writer.submit(op)

    async def _read(self, fn: Callable[[Connection], Any]) -> Any:
        return await asyncio.to_thread(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[Connection], Any]) -> Any:
        # Back in the pool, the connection's read transaction is rolled back: the next read sees newer commits.
        with database.connect(self._engine, self._where) as conn:
            try:
                return fn(conn)
            except OperationRefused as refused:  # bad input, seen before the driver
                raise refused.error from None

    # --- experiments, phases, allocations -------------------------------------------------------
    async def load_catalog(self, key: str | None = None) -> list[CatalogEntry]:
        """Every experiment (or the one named) with its current phase and latest allocation, read
        over one connection."""
        return await self._read(lambda conn: _catalog_entries(conn, key))

    async def load_phase(self, key: str, phase: int) -> PhaseRow | None:
        row = await self._read(lambda conn: conn.execute(_PHASE, {"key": key, "phase": phase}).first())
        return None if row is None else PhaseRow(key, phase, row[0], float(row[1]),
                                                 None if row[2] is None else float(row[2]))

    async def edit_experiment(self, key: str, plan: Callable[[ExperimentRow | None], ExperimentChange | None]
                              ) -> tuple[CatalogEntry, bool]:
        """Read the experiment's stored row, let `plan` decide the change from it, and write that
        change, all in one transaction that holds the experiment's lock; returns the experiment as
        this edit left it and whether the edit created it. `plan` returns None for "nothing to
        change" and may raise ExperimentError.

        Several replicas edit one experiment safely: each edit is planned on the state the previous
        one committed, so phase numbers never collide and no edit is lost."""
        def op(conn: Connection) -> tuple[CatalogEntry, bool]:
            database.lock_experiment(conn, key)
            found = conn.execute(_EXPERIMENT, {"key": key}).first()
            current = None if found is None else _experiment_row(found)
            try:
                change = plan(current)
            except ExperimentError as exc:
                raise OperationRefused(exc) from None
            if change is not None:
                _apply_change(conn, change)
            after = _catalog_entries(conn, key)
            if not after:  # plan left a missing experiment missing
                raise OperationRefused(not_found("experiment", key, "experiment"))
            return after[0], current is None and change is not None

        try:
            return await self._write(op)
        except sa.exc.DBAPIError as exc:
            # The lock makes this rare (a deadlock retried past its limit, a row written by an
            # older version): the edit wrote nothing, and sending it again is safe.
            if isinstance(exc, sa.exc.IntegrityError) or database.is_retryable(exc):
                raise ExperimentError(f"Experiment {key!r} was being changed by another request at the same "
                                      "moment; nothing was written, send the edit again.", status=409,
                                      code="edit_conflict", param="key") from None
            raise

    async def add_allocation(self, key: str, phase: int, allocation: AllocationRow) -> bool:
        return await self._write(lambda conn: _insert_allocation(conn, key, phase, allocation))

    async def load_allocations(self, key: str, phase: int) -> list[AllocationRow]:
        return await self._read(lambda conn: load_allocations(conn, key, phase))

    # --- the request path ---------------------------------------------------------------------
    async def assign(self, key: str, phase: int, unit_id: str, arm: str, probability: float,
                     allocation_version: int, exposure_id: str, request_id: str,
                     alphas: dict[str, float], now: float) -> StoredAssignment:
        def op(conn: Connection) -> StoredAssignment:
            # The phase must still be the running one. FOR SHARE (PostgreSQL) makes an edit that ends
            # the phase wait for this transaction, or this one wait for the edit and see it: no
            # exposure lands in a phase after it ended, whichever replica logs it.
            stored_phase = conn.execute(_RUNNING_PHASE, {"key": key}).first()
            if stored_phase is None or int(stored_phase[0]) != phase or stored_phase[1] != "running":
                raise OperationRefused(PhaseMoved(key))
            # Insert-if-absent, then read back: under concurrency (several replicas) the first
            # exposure's arm wins and every later exposure of the unit in this phase follows it.
            inserted = database.upsert(conn, assignments, dict(
                key=key, phase=phase, unit_id=unit_id, arm=arm, probability=probability,
                allocation_version=allocation_version, first_exposure_id=exposure_id, created_at=now),
                ("key", "phase", "unit_id"))
            stored = conn.execute(_ASSIGNMENT, {"key": key, "phase": phase, "unit_id": unit_id}).one()
            stored_arm, stored_probability, stored_version = stored[0], float(stored[1]), int(stored[2])
            conn.execute(exposures.insert(), dict(
                exposure_id=exposure_id, key=key, phase=phase, arm=stored_arm, alpha=alphas[stored_arm],
                unit_id=unit_id, request_id=request_id, probability=stored_probability,
                allocation_version=stored_version, created_at=now))
            return StoredAssignment(stored_arm, stored_probability, stored_version, inserted.rowcount == 1)

        return await self._write(op)

    async def record_outcome(self, exposure_id: str, latency_s: float | None, ttft_s: float | None,
                             output_tokens: int | None, finish_reason: str | None, aborted: bool, now: float) -> None:
        def op(conn: Connection) -> None:
            _exposure_target(conn, exposure_id)
            database.upsert(conn, outcomes, dict(
                exposure_id=exposure_id, latency_s=latency_s, ttft_s=ttft_s, output_tokens=output_tokens,
                finish_reason=finish_reason, aborted=int(aborted), created_at=now),
                ("exposure_id",), ("latency_s", "ttft_s", "output_tokens", "finish_reason", "aborted", "created_at"))

        await self._write(op)

    async def upsert_feedback(self, exposure_id: str, name: str, value: float, comment: str | None, now: float,
                              check: Callable[[str, int], None]) -> FeedbackTarget:
        def op(conn: Connection) -> FeedbackTarget:
            key, phase, arm = _exposure_target(conn, exposure_id)
            try:
                check(key, phase)
            except ExperimentError as exc:
                raise OperationRefused(exc) from None
            previous = conn.execute(_FEEDBACK_EXISTS, {"exposure_id": exposure_id, "name": name}).first()
            # A repeated vote replaces the earlier one; created_at keeps the first vote's time.
            database.upsert(conn, feedback, dict(exposure_id=exposure_id, name=name, value=value, comment=comment,
                                                 created_at=now, updated_at=now),
                            ("exposure_id", "name"), ("value", "comment", "updated_at"))
            return FeedbackTarget(key, phase, arm, previous is not None)

        return await self._write(op)

    # --- battles ------------------------------------------------------------------------------
    async def create_battle(self, battle: BattleRow, unit_id: str | None, now: float) -> None:
        await self._write(lambda conn: conn.execute(battles.insert(), dict(
            battle_id=battle.battle_id, key=battle.key, phase=battle.phase, left_arm=battle.left_arm,
            right_arm=battle.right_arm, left_alpha=battle.left_alpha, right_alpha=battle.right_alpha,
            unit_id=unit_id, created_at=now)))

    async def vote(self, battle_id: str, winner: str, now: float) -> BattleRow:
        def op(conn: Connection) -> BattleRow:
            row = conn.execute(_BATTLE, {"battle_id": battle_id}).first()
            if row is None:
                raise OperationRefused(not_found("battle", battle_id))
            database.upsert(conn, battle_votes, dict(battle_id=battle_id, winner=winner, created_at=now, updated_at=now),
                            ("battle_id",), ("winner", "updated_at"))
            return BattleRow(battle_id, row[0], int(row[1]), row[2], row[3], float(row[4]), float(row[5]), winner)

        return await self._write(op)

    # --- analysis and support -------------------------------------------------------------------
    async def phase_data(self, key: str, phase: int, primary_metric: str, timeline_origin: float | None,
                         timeline_points: int) -> PhaseData:
        return await self._read(lambda conn: phase_data(conn, key, phase, primary_metric, timeline_origin,
                                                        timeline_points))

    async def exposure(self, exposure_id: str) -> dict | None:
        """An exposure with its outcome and feedback, for support."""
        def fn(conn: Connection) -> dict | None:
            by_id = {"exposure_id": exposure_id}
            row = conn.execute(_EXPOSURE, by_id).first()
            if row is None:
                return None
            result = dict(row._mapping)
            out = conn.execute(_OUTCOME, by_id).first()
            result["outcome"] = None if out is None else {**out._mapping, "aborted": bool(out.aborted)}
            result["feedback"] = {r.name: {"value": float(r.value), "comment": r.comment}
                                  for r in conn.execute(_FEEDBACK, by_id)}
            return result

        return await self._read(fn)


# Statements built once and run with parameters: building one costs far more than running it.
def _where(*columns: sa.Column) -> list:
    return [column == sa.bindparam(column.name) for column in columns]


_x, _p, _a, _e, _o, _f, _b = (experiments.c, phases.c, assignments.c, exposures.c, outcomes.c, feedback.c,
                              battles.c)
_EXPERIMENT_COLUMNS = (_x.key, _x.definition, _x.status, _x.phase, _x.is_default, _x.file_signature, _x.updated_at)
_EXPERIMENTS = sa.select(*_EXPERIMENT_COLUMNS).order_by(_x.key)
_EXPERIMENT = sa.select(*_EXPERIMENT_COLUMNS).where(*_where(_x.key))
_RUNNING_PHASE = sa.select(_x.phase, _x.status).where(*_where(_x.key)).with_for_update(read=True)
_PHASE = sa.select(_p.definition, _p.started_at, _p.ended_at).where(*_where(_p.key, _p.phase))
_t = allocations.c
_LATEST_ALLOCATION = sa.select(_t.version, _t.created_at, _t.weights, _t.reason).where(
    *_where(_t.key, _t.phase)).order_by(_t.version.desc()).limit(1)
_ASSIGNMENT = sa.select(_a.arm, _a.probability, _a.allocation_version).where(*_where(_a.key, _a.phase, _a.unit_id))
_EXPOSURE_TARGET = sa.select(_e.key, _e.phase, _e.arm).where(*_where(_e.exposure_id))
_FEEDBACK_EXISTS = sa.select(sa.literal(1)).where(*_where(_f.exposure_id, _f.name))
_BATTLE = sa.select(_b.key, _b.phase, _b.left_arm, _b.right_arm, _b.left_alpha, _b.right_alpha).where(
    *_where(_b.battle_id))
_EXPOSURE = sa.select(_e.exposure_id, _e.key.label("experiment"), _e.phase, _e.arm, _e.alpha, _e.unit_id,
                      _e.request_id, _e.probability, _e.allocation_version, _e.created_at).where(*_where(_e.exposure_id))
_OUTCOME = sa.select(_o.latency_s, _o.ttft_s, _o.output_tokens, _o.finish_reason, _o.aborted).where(
    *_where(_o.exposure_id))
_FEEDBACK = sa.select(_f.name, _f.value, _f.comment).where(*_where(_f.exposure_id)).order_by(_f.name)


def _catalog_entries(conn: Connection, key: str | None) -> list[CatalogEntry]:
    rows = conn.execute(_EXPERIMENTS) if key is None else conn.execute(_EXPERIMENT, {"key": key})
    entries = []
    for row in [_experiment_row(r) for r in rows]:
        phase = allocation = None
        if row.phase > 0:
            found = conn.execute(_PHASE, {"key": row.key, "phase": row.phase}).first()
            phase = None if found is None else PhaseRow(row.key, row.phase, found[0], float(found[1]),
                                                        None if found[2] is None else float(found[2]))
            latest = conn.execute(_LATEST_ALLOCATION, {"key": row.key, "phase": row.phase}).first()
            allocation = None if latest is None else AllocationRow(int(latest[0]), float(latest[1]), latest[2], latest[3])
        entries.append(CatalogEntry(row, phase, allocation))
    return entries


def _experiment_row(r) -> ExperimentRow:
    return ExperimentRow(r[0], r[1], r[2], int(r[3]), bool(r[4]), r[5], float(r[6]))


def _apply_change(conn: Connection, change: ExperimentChange) -> None:
    row, p = change.row, phases.c
    if change.clear_other_defaults:
        conn.execute(experiments.update().where(experiments.c.key != row.key).values(is_default=0))
    database.upsert(conn, experiments, dict(
        key=row.key, definition=row.definition, status=row.status, phase=row.phase,
        is_default=int(row.is_default), file_signature=row.file_signature, updated_at=row.updated_at),
        ("key",), ("definition", "status", "phase", "is_default", "file_signature", "updated_at"))
    if change.end_phase_at is not None and change.ended_phase is not None:
        conn.execute(phases.update().where(p.key == row.key, p.phase == change.ended_phase, p.ended_at.is_(None))
                     .values(ended_at=change.end_phase_at))
    if change.start_phase is not None:
        start = change.start_phase
        conn.execute(phases.insert(), dict(key=start.key, phase=start.phase, definition=start.definition,
                                           started_at=start.started_at, ended_at=None))
    elif change.update_phase_definition and row.phase > 0:
        conn.execute(phases.update().where(p.key == row.key, p.phase == row.phase).values(definition=row.definition))
    if change.initial_allocation is not None:
        _insert_allocation(conn, row.key, row.phase, change.initial_allocation)


def _insert_allocation(conn: Connection, key: str, phase: int, a: AllocationRow) -> bool:
    inserted = database.upsert(conn, allocations, dict(key=key, phase=phase, version=a.version, created_at=a.created_at,
                                                       weights=a.weights, reason=a.reason), ("key", "phase", "version"))
    return inserted.rowcount == 1


def _exposure_target(conn: Connection, exposure_id: str) -> tuple[str, int, str]:
    """(experiment, phase, arm) of an exposure; refuses an unknown id."""
    row = conn.execute(_EXPOSURE_TARGET, {"exposure_id": exposure_id}).first()
    if row is None:
        raise OperationRefused(not_found("exposure", exposure_id, "exposure_id"))
    return row[0], int(row[1]), row[2]
