"""The SQL shared by the SQLite and PostgreSQL stores (written in the dialect both accept)."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

from .battles import Battle
from .errors import ExperimentError, not_found
from .store import (AllocationRow, BattleRow, ExperimentChange, ExperimentRow, ExperimentStore, FeedbackTarget,
                    PhaseData, PhaseRow, StoredAssignment)
from .writer import BatchWriter, OperationRefused

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS expo_experiments (
        key TEXT PRIMARY KEY, definition TEXT NOT NULL, status TEXT NOT NULL, phase INTEGER NOT NULL,
        is_default INTEGER NOT NULL, file_signature TEXT, updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS expo_phases (
        key TEXT NOT NULL, phase INTEGER NOT NULL, definition TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, PRIMARY KEY (key, phase))""",
    """CREATE TABLE IF NOT EXISTS expo_allocations (
        key TEXT NOT NULL, phase INTEGER NOT NULL, version BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        weights TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (key, phase, version))""",
    """CREATE TABLE IF NOT EXISTS expo_assignments (
        key TEXT NOT NULL, phase INTEGER NOT NULL, unit_id TEXT NOT NULL, arm TEXT NOT NULL,
        probability DOUBLE PRECISION NOT NULL, allocation_version BIGINT NOT NULL, first_exposure_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (key, phase, unit_id))""",
    """CREATE TABLE IF NOT EXISTS expo_exposures (
        exposure_id TEXT PRIMARY KEY, key TEXT NOT NULL, phase INTEGER NOT NULL, arm TEXT NOT NULL,
        alpha DOUBLE PRECISION NOT NULL, unit_id TEXT NOT NULL, request_id TEXT NOT NULL,
        probability DOUBLE PRECISION NOT NULL, allocation_version BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS expo_exposures_phase ON expo_exposures (key, phase, arm)",
    """CREATE TABLE IF NOT EXISTS expo_outcomes (
        exposure_id TEXT PRIMARY KEY, latency_s DOUBLE PRECISION, ttft_s DOUBLE PRECISION, output_tokens INTEGER,
        finish_reason TEXT, aborted INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS expo_feedback (
        exposure_id TEXT NOT NULL, name TEXT NOT NULL, value DOUBLE PRECISION NOT NULL, comment TEXT,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (exposure_id, name))""",
    """CREATE TABLE IF NOT EXISTS expo_battles (
        battle_id TEXT PRIMARY KEY, key TEXT NOT NULL, phase INTEGER NOT NULL, left_arm TEXT NOT NULL,
        right_arm TEXT NOT NULL, left_alpha DOUBLE PRECISION NOT NULL, right_alpha DOUBLE PRECISION NOT NULL,
        unit_id TEXT, created_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS expo_battles_phase ON expo_battles (key, phase)",
    """CREATE TABLE IF NOT EXISTS expo_battle_votes (
        battle_id TEXT PRIMARY KEY, winner TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
]

# Implicit metrics as SQL over outcomes. Aborted requests are left out of latency and length,
# which they would otherwise shorten; `aborted` itself counts them.
_IMPLICIT_SQL = {
    "latency_s": ("SUM(o.latency_s)", "COUNT(o.latency_s)", "o.aborted = 0"),
    "ttft_s": ("SUM(o.ttft_s)", "COUNT(o.ttft_s)", "1 = 1"),
    "output_tokens": ("SUM(o.output_tokens)", "COUNT(o.output_tokens)", "o.aborted = 0"),
    "aborted": ("SUM(o.aborted)", "COUNT(*)", "1 = 1"),
    "truncated": ("SUM(CASE WHEN o.finish_reason = 'length' THEN 1 ELSE 0 END)", "COUNT(*)", "o.aborted = 0"),
}


class Tx:
    """A connection seen through `?` placeholders, whatever the driver's own style."""

    def __init__(self, conn, convert: Callable[[str], str]):
        self.conn = conn
        self._convert = convert

    def run(self, sql: str, params: tuple = ()) -> Any:
        # PostgreSQL text cannot hold NUL, and an id or comment with one is no one's anyway: refused
        # the same way on every store, as bad input rather than a driver error (a 500).
        if any(isinstance(v, str) and "\x00" in v for v in params):
            raise OperationRefused(ExperimentError(
                "Identifiers, units and comments cannot contain the NUL character (\\u0000).", code="invalid_value"))
        return self.conn.execute(self._convert(sql), params)

    def one(self, sql: str, params: tuple = ()):
        return self.run(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list:
        return list(self.run(sql, params).fetchall())


class SqlStore(ExperimentStore):
    """All queries; subclasses supply connections and the few dialect differences."""

    placeholder_convert: Callable[[str], str] = staticmethod(lambda sql: sql)

    def __init__(self, url: str):
        self.url = url
        self._writer = BatchWriter(self)
        self._readers: list = []
        self._idle_readers: list = []
        self._reader_lock = threading.Lock()
        self._started = False

    # --- dialect hooks (BatchWriter's Dialect protocol and readers) ------------------------
    def connect_writer(self):
        raise NotImplementedError

    def connect_reader(self):
        raise NotImplementedError

    def begin(self, conn) -> None:
        raise NotImplementedError

    def commit(self, conn) -> None:
        conn.commit()

    def rollback(self, conn) -> None:
        conn.rollback()

    def is_retryable(self, exc: BaseException) -> bool:
        return False

    def is_disconnect(self, exc: BaseException) -> bool:
        return False

    def bucket_sql(self, expr: str) -> str:
        raise NotImplementedError

    def create_schema(self, tx: Tx) -> None:
        for statement in SCHEMA:
            tx.run(statement)

    def wrap(self, conn) -> Tx:
        return Tx(conn, self.placeholder_convert)

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._writer.start()
        self._started = True
        await self._writer.submit(self.create_schema)

    async def close(self) -> None:
        if not self._started:
            return
        await asyncio.to_thread(self._writer.close)
        with self._reader_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
            self._readers.clear()
            self._idle_readers.clear()
        self._started = False

    async def _write(self, op: Callable[[Tx], Any]) -> Any:
        return await self._writer.submit(op)

    async def _read(self, fn: Callable[[Tx], Any]) -> Any:
        return await asyncio.to_thread(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[Tx], Any]) -> Any:
        with self._reader_lock:
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            conn = self.connect_reader()
            with self._reader_lock:
                self._readers.append(conn)
        try:
            result = fn(self.wrap(conn))
            self.end_read(conn)
        except OperationRefused as refused:  # bad input, seen before the driver: the connection is fine
            self.end_read(conn)
            with self._reader_lock:
                self._idle_readers.append(conn)
            raise refused.error from None
        except BaseException:
            with self._reader_lock:
                self._readers.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        with self._reader_lock:
            self._idle_readers.append(conn)
        return result

    def end_read(self, conn) -> None:
        """Close the read transaction so the next read sees newer commits."""
        conn.rollback()

    # --- experiments --------------------------------------------------------------------------
    async def load_experiments(self) -> list[ExperimentRow]:
        rows = await self._read(lambda tx: tx.all(
            "SELECT key, definition, status, phase, is_default, file_signature, updated_at FROM expo_experiments ORDER BY key"))
        return [ExperimentRow(r[0], json.loads(r[1]), r[2], int(r[3]), bool(r[4]), r[5], float(r[6])) for r in rows]

    async def load_phase(self, key: str, phase: int) -> PhaseRow | None:
        row = await self._read(lambda tx: tx.one(
            "SELECT definition, started_at, ended_at FROM expo_phases WHERE key = ? AND phase = ?", (key, phase)))
        return None if row is None else PhaseRow(key, phase, json.loads(row[0]), float(row[1]),
                                                 None if row[2] is None else float(row[2]))

    async def apply_change(self, change: ExperimentChange) -> None:
        row = change.row

        def op(tx: Tx) -> None:
            if change.clear_other_defaults:
                tx.run("UPDATE expo_experiments SET is_default = 0 WHERE key <> ?", (row.key,))
            tx.run("""INSERT INTO expo_experiments (key, definition, status, phase, is_default, file_signature, updated_at)
                      VALUES (?, ?, ?, ?, ?, ?, ?)
                      ON CONFLICT (key) DO UPDATE SET definition = excluded.definition, status = excluded.status,
                        phase = excluded.phase, is_default = excluded.is_default,
                        file_signature = excluded.file_signature, updated_at = excluded.updated_at""",
                   (row.key, json.dumps(row.definition), row.status, row.phase, int(row.is_default),
                    row.file_signature, row.updated_at))
            if change.end_phase_at is not None and change.ended_phase is not None:
                tx.run("UPDATE expo_phases SET ended_at = ? WHERE key = ? AND phase = ? AND ended_at IS NULL",
                       (change.end_phase_at, row.key, change.ended_phase))
            if change.start_phase is not None:
                p = change.start_phase
                tx.run("INSERT INTO expo_phases (key, phase, definition, started_at, ended_at) VALUES (?, ?, ?, ?, NULL)",
                       (p.key, p.phase, json.dumps(p.definition), p.started_at))
            elif change.update_phase_definition and row.phase > 0:
                tx.run("UPDATE expo_phases SET definition = ? WHERE key = ? AND phase = ?",
                       (json.dumps(row.definition), row.key, row.phase))
            if change.initial_allocation is not None:
                self._insert_allocation(tx, row.key, row.phase, change.initial_allocation)

        await self._write(op)

    @staticmethod
    def _insert_allocation(tx: Tx, key: str, phase: int, a: AllocationRow) -> bool:
        cur = tx.run("""INSERT INTO expo_allocations (key, phase, version, created_at, weights, reason)
                        VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key, phase, version) DO NOTHING""",
                     (key, phase, a.version, a.created_at, json.dumps(a.weights), a.reason))
        return cur.rowcount == 1

    async def add_allocation(self, key: str, phase: int, allocation: AllocationRow) -> bool:
        return await self._write(lambda tx: self._insert_allocation(tx, key, phase, allocation))

    async def load_allocations(self, key: str, phase: int) -> list[AllocationRow]:
        rows = await self._read(lambda tx: tx.all(
            "SELECT version, created_at, weights, reason FROM expo_allocations WHERE key = ? AND phase = ? ORDER BY version",
            (key, phase)))
        return [AllocationRow(int(r[0]), float(r[1]), json.loads(r[2]), r[3]) for r in rows]

    # --- the request path ---------------------------------------------------------------------
    async def assign(self, key, phase, unit_id, arm, probability, allocation_version, exposure_id, request_id,
                     alphas, now) -> StoredAssignment:
        def op(tx: Tx) -> StoredAssignment:
            # Insert-if-absent, then read back: under concurrency (several replicas) the first
            # exposure's arm wins and every later exposure of the unit in this phase follows it.
            cur = tx.run("""INSERT INTO expo_assignments
                              (key, phase, unit_id, arm, probability, allocation_version, first_exposure_id, created_at)
                            VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, phase, unit_id) DO NOTHING""",
                         (key, phase, unit_id, arm, probability, allocation_version, exposure_id, now))
            first = cur.rowcount == 1
            stored = tx.one("SELECT arm, probability, allocation_version FROM expo_assignments "
                            "WHERE key = ? AND phase = ? AND unit_id = ?", (key, phase, unit_id))
            stored_arm = stored[0]
            tx.run("""INSERT INTO expo_exposures (exposure_id, key, phase, arm, alpha, unit_id, request_id, probability,
                                                  allocation_version, created_at)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                   (exposure_id, key, phase, stored_arm, alphas[stored_arm], unit_id, request_id, float(stored[1]),
                    int(stored[2]), now))
            return StoredAssignment(stored_arm, float(stored[1]), int(stored[2]), first)

        return await self._write(op)

    async def record_outcome(self, exposure_id, latency_s, ttft_s, output_tokens, finish_reason, aborted, now) -> None:
        def op(tx: Tx) -> None:
            if tx.one("SELECT 1 FROM expo_exposures WHERE exposure_id = ?", (exposure_id,)) is None:
                raise OperationRefused(not_found("exposure", exposure_id, "exposure_id"))
            tx.run("""INSERT INTO expo_outcomes (exposure_id, latency_s, ttft_s, output_tokens, finish_reason, aborted, created_at)
                      VALUES (?, ?, ?, ?, ?, ?, ?)
                      ON CONFLICT (exposure_id) DO UPDATE SET latency_s = excluded.latency_s, ttft_s = excluded.ttft_s,
                        output_tokens = excluded.output_tokens, finish_reason = excluded.finish_reason,
                        aborted = excluded.aborted, created_at = excluded.created_at""",
                   (exposure_id, latency_s, ttft_s, output_tokens, finish_reason, int(aborted), now))

        await self._write(op)

    async def upsert_feedback(self, exposure_id, name, value, comment, now, check) -> FeedbackTarget:
        def op(tx: Tx) -> FeedbackTarget:
            row = tx.one("SELECT key, phase, arm FROM expo_exposures WHERE exposure_id = ?", (exposure_id,))
            if row is None:
                raise OperationRefused(not_found("exposure", exposure_id, "exposure_id"))
            try:
                check(row[0], int(row[1]))
            except ExperimentError as exc:
                raise OperationRefused(exc) from None
            previous = tx.one("SELECT 1 FROM expo_feedback WHERE exposure_id = ? AND name = ?", (exposure_id, name))
            # A repeated vote replaces the earlier one; created_at keeps the first vote's time.
            tx.run("""INSERT INTO expo_feedback (exposure_id, name, value, comment, created_at, updated_at)
                      VALUES (?, ?, ?, ?, ?, ?)
                      ON CONFLICT (exposure_id, name) DO UPDATE SET value = excluded.value,
                        comment = excluded.comment, updated_at = excluded.updated_at""",
                   (exposure_id, name, value, comment, now, now))
            return FeedbackTarget(row[0], int(row[1]), row[2], previous is not None)

        return await self._write(op)

    # --- battles ------------------------------------------------------------------------------
    async def create_battle(self, battle: BattleRow, unit_id: str | None, now: float) -> None:
        await self._write(lambda tx: tx.run(
            """INSERT INTO expo_battles (battle_id, key, phase, left_arm, right_arm, left_alpha, right_alpha, unit_id, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (battle.battle_id, battle.key, battle.phase, battle.left_arm, battle.right_arm, battle.left_alpha,
             battle.right_alpha, unit_id, now)))

    async def vote(self, battle_id: str, winner: str, now: float) -> BattleRow:
        def op(tx: Tx) -> BattleRow:
            row = tx.one("SELECT key, phase, left_arm, right_arm, left_alpha, right_alpha FROM expo_battles "
                         "WHERE battle_id = ?", (battle_id,))
            if row is None:
                raise OperationRefused(not_found("battle", battle_id))
            tx.run("""INSERT INTO expo_battle_votes (battle_id, winner, created_at, updated_at) VALUES (?, ?, ?, ?)
                      ON CONFLICT (battle_id) DO UPDATE SET winner = excluded.winner, updated_at = excluded.updated_at""",
                   (battle_id, winner, now, now))
            return BattleRow(battle_id, row[0], int(row[1]), row[2], row[3], float(row[4]), float(row[5]), winner)

        return await self._write(op)

    # --- analysis -----------------------------------------------------------------------------
    async def phase_data(self, key, phase, primary_metric, timeline_origin, timeline_points) -> PhaseData:
        return await self._read(lambda tx: self._phase_data(tx, key, phase, primary_metric, timeline_origin,
                                                            timeline_points))

    def _phase_data(self, tx: Tx, key, phase, primary_metric, origin, points) -> PhaseData:
        kp = (key, phase)
        exposures = {r[0]: int(r[1]) for r in tx.all(
            "SELECT arm, COUNT(*) FROM expo_exposures WHERE key = ? AND phase = ? GROUP BY arm", kp)}
        span = tx.one("SELECT MIN(created_at), MAX(created_at) FROM expo_exposures WHERE key = ? AND phase = ?", kp)
        # The timeline spans the phase's activity: from its start to its last exposure.
        first = None if span[0] is None else float(span[0])
        last = None if span[1] is None else float(span[1])
        origin = origin if origin is not None else (first or 0.0)
        width = max(((last or origin) - origin) / points, 1e-3)
        units = [(r[0], int(r[1]), int(r[2])) for r in tx.all(
            "SELECT arm, allocation_version, COUNT(*) FROM expo_assignments WHERE key = ? AND phase = ? "
            "GROUP BY arm, allocation_version", kp)]
        metric_rows = [(r[0], r[1], r[2], float(r[3]), int(r[4])) for r in tx.all(
            """SELECT e.arm, e.unit_id, f.name, SUM(f.value), COUNT(*) FROM expo_feedback f
               JOIN expo_exposures e ON e.exposure_id = f.exposure_id
               WHERE e.key = ? AND e.phase = ? GROUP BY e.arm, e.unit_id, f.name""", kp)]
        for name, (total, count, where) in _IMPLICIT_SQL.items():
            metric_rows += [(r[0], r[1], name, float(r[2]), int(r[3])) for r in tx.all(
                f"""SELECT e.arm, e.unit_id, {total}, {count} FROM expo_outcomes o
                    JOIN expo_exposures e ON e.exposure_id = o.exposure_id
                    WHERE e.key = ? AND e.phase = ? AND {where} GROUP BY e.arm, e.unit_id""", kp) if r[3]]
        timeline_rows = self._timeline_rows(tx, key, phase, primary_metric, origin, width)
        battles = [Battle(r[0], r[1], r[2]) for r in tx.all(
            """SELECT b.left_arm, b.right_arm, v.winner FROM expo_battles b
               JOIN expo_battle_votes v ON v.battle_id = b.battle_id WHERE b.key = ? AND b.phase = ?""", kp)]
        allocations = [AllocationRow(int(r[0]), float(r[1]), json.loads(r[2]), r[3]) for r in tx.all(
            "SELECT version, created_at, weights, reason FROM expo_allocations WHERE key = ? AND phase = ? ORDER BY version", kp)]
        return PhaseData(exposures, units, metric_rows, timeline_rows, battles, allocations, first, last, origin, width)

    def _timeline_rows(self, tx: Tx, key, phase, metric, origin, width) -> list[tuple[str, str, int, float, int]]:
        if metric in _IMPLICIT_SQL:
            total, count, where = _IMPLICIT_SQL[metric]
            bucket = self.bucket_sql("(o.created_at - ?) / ?")
            sql = f"""SELECT e.arm, e.unit_id, {bucket} AS bucket, {total}, {count} FROM expo_outcomes o
                      JOIN expo_exposures e ON e.exposure_id = o.exposure_id
                      WHERE e.key = ? AND e.phase = ? AND {where} GROUP BY e.arm, e.unit_id, bucket"""
            params = (origin, width, key, phase)
        else:
            bucket = self.bucket_sql("(f.created_at - ?) / ?")
            sql = f"""SELECT e.arm, e.unit_id, {bucket} AS bucket, SUM(f.value), COUNT(*) FROM expo_feedback f
                      JOIN expo_exposures e ON e.exposure_id = f.exposure_id
                      WHERE e.key = ? AND e.phase = ? AND f.name = ? GROUP BY e.arm, e.unit_id, bucket"""
            params = (origin, width, key, phase, metric)
        return [(r[0], r[1], int(r[2]), float(r[3]), int(r[4])) for r in tx.all(sql, params) if r[4]]

    async def exposure(self, exposure_id: str) -> dict | None:
        def fn(tx: Tx) -> dict | None:
            row = tx.one("""SELECT exposure_id, key, phase, arm, alpha, unit_id, request_id, probability,
                                   allocation_version, created_at FROM expo_exposures WHERE exposure_id = ?""", (exposure_id,))
            if row is None:
                return None
            names = ("exposure_id", "experiment", "phase", "arm", "alpha", "unit_id", "request_id", "probability",
                     "allocation_version", "created_at")
            result = dict(zip(names, row))
            out = tx.one("SELECT latency_s, ttft_s, output_tokens, finish_reason, aborted FROM expo_outcomes "
                         "WHERE exposure_id = ?", (exposure_id,))
            result["outcome"] = None if out is None else dict(zip(
                ("latency_s", "ttft_s", "output_tokens", "finish_reason", "aborted"), (*out[:4], bool(out[4]))))
            result["feedback"] = {r[0]: {"value": float(r[1]), "comment": r[2]} for r in tx.all(
                "SELECT name, value, comment FROM expo_feedback WHERE exposure_id = ? ORDER BY name", (exposure_id,))}
            return result

        return await self._read(fn)
