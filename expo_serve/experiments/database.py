"""The SQLAlchemy engine of an experiments store: what differs between SQLite and PostgreSQL lives
here, as engine settings and events, so the queries have one code path.

SQLite: one file in WAL mode, fsync on every commit (synchronous=FULL). WAL lets the readers of the
results route run while the writer commits; FULL makes every acknowledged batch survive not only a
killed process but a power cut. The writer takes the write lock when its transaction begins
(BEGIN IMMEDIATE), so a second process waits for it instead of failing half-way.
PostgreSQL (psycopg 3, the optional `postgres` extra): several replicas share one experiment state.
"""
from __future__ import annotations

import functools
import importlib.util
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ..errors import ExpoError
from .errors import ExperimentError
from .schema import metadata
from .writer import OperationRefused

WRITER = "expo_writer"   # execution option that marks the writer's connection
SCHEMA_LOCK = 0x6578706F  # "expo": serialises CREATE TABLE across PostgreSQL replicas starting together
EDIT_LOCK = 0x65787045    # with the key's hash: serialises the edits of one experiment across replicas
# PostgreSQL: deadlock, serialization failure, lock not available. The batch is simply tried again.
_RETRY_SQLSTATES = {"40P01", "40001", "55P03"}
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def sqlite_engine(path: Path) -> Engine:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExpoError(f"Cannot create the folder for the experiments database {path}: {exc.strerror}.") from None
    engine = _engine(sa.engine.URL.create("sqlite", database=str(path)), connect_args={"timeout": 30.0})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's begin event emits BEGIN, not the driver
        cursor = dbapi_conn.cursor()
        try:
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ExpoError(f"The experiments database {path} cannot use WAL mode (got {mode}).")
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITER) else "BEGIN")

    return engine


def postgres_engine(url: str) -> Engine:
    if importlib.util.find_spec("psycopg") is None:
        raise ExpoError("A postgresql:// --db needs psycopg 3: pip install 'psycopg[binary]'.")
    return _engine(sa.engine.make_url(url).set(drivername="postgresql+psycopg"), connect_args={"connect_timeout": 10})


def _engine(url: sa.engine.URL, connect_args: dict) -> Engine:
    # Readers come and go on worker threads: the pool may grow past its idle size as they need.
    engine = sa.create_engine(url, connect_args=connect_args, pool_size=4, max_overflow=32)
    event.listen(engine, "before_cursor_execute", _refuse_nul)
    return engine


def _refuse_nul(_conn, _cursor, _statement, parameters, _context, _executemany) -> None:
    # PostgreSQL text cannot hold NUL, and an id or comment with one is no one's anyway: refused
    # the same way on every store, as bad input rather than a driver error (a 500).
    if any(isinstance(v, str) and "\x00" in v for v in _values(parameters)):
        raise OperationRefused(ExperimentError(
            "Identifiers, units and comments cannot contain the NUL character (\\u0000).", code="invalid_value"))


def _values(parameters: Any):
    if isinstance(parameters, dict):
        parameters = parameters.values()
    for value in parameters or ():
        if isinstance(value, (dict, list, tuple)):
            yield from _values(value)
        else:
            yield value


def connect(engine: Engine, where: str, *, writer: bool = False) -> Connection:
    """A pooled connection; a database that cannot be reached is one clear sentence."""
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        raise ExpoError(f"Cannot open the experiments database {where}: {reason}.") from None
    return conn.execution_options(**{WRITER: True}) if writer else conn


def create_schema(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
    metadata.create_all(conn, checkfirst=True)


def lock_experiment(conn: Connection, key: str) -> None:
    """Hold the experiment's edit lock until the transaction ends.

    PostgreSQL: an advisory lock on (EDIT_LOCK, hash of the key), which exists before the row does,
    so two replicas creating one experiment wait for each other too. SQLite needs none: the
    writer's BEGIN IMMEDIATE already holds the whole database's write lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(_EDIT_LOCK, {"key": key})


_EDIT_LOCK = sa.select(sa.func.pg_advisory_xact_lock(sa.literal(EDIT_LOCK, sa.Integer),
                                                     sa.func.hashtext(sa.bindparam("key", type_=sa.Text))))


def upsert(conn: Connection, table: sa.Table, values: dict, keys: tuple[str, ...], update: tuple[str, ...] = ()):
    """INSERT … ON CONFLICT (keys) DO NOTHING, or DO UPDATE SET `update` from the new row.

    The result's rowcount says whether a row was written (DO NOTHING: 0 when the key existed)."""
    return conn.execute(_upsert_statement(conn.dialect.name, table, keys, update), values,
                        execution_options={"preserve_rowcount": True})


@functools.cache
def _upsert_statement(dialect: str, table: sa.Table, keys: tuple[str, ...], update: tuple[str, ...]):
    insert = _INSERTS[dialect](table)
    if update:
        return insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in update})
    return insert.on_conflict_do_nothing(index_elements=keys)


def is_retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig).lower()


def is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
