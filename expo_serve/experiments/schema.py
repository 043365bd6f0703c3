"""The experiments database: its tables, as SQLAlchemy Core metadata for SQLite and PostgreSQL alike.

Names, columns and types are those the hand-written DDL of earlier versions created, so a
database made by them opens unchanged (tables are only created where missing). JSON is kept as
TEXT and flags as INTEGER 0/1 for the same reason.
"""
from __future__ import annotations

import json

from sqlalchemy import DOUBLE_PRECISION, BigInteger, Column, Index, Integer, MetaData, Table, Text, TypeDecorator
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class JsonText(TypeDecorator):
    """A JSON document in a TEXT column."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else json.dumps(value)

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


def _key() -> Column:
    return Column("key", Text, nullable=False)


def _phase() -> Column:
    return Column("phase", Integer, nullable=False, autoincrement=False)


def _time(name: str, nullable: bool = False) -> Column:
    return Column(name, DOUBLE_PRECISION, nullable=nullable)


metadata = MetaData()

experiments = Table(
    "expo_experiments", metadata,
    Column("key", Text, primary_key=True), Column("definition", JsonText, nullable=False),
    Column("status", Text, nullable=False), _phase(), Column("is_default", Integer, nullable=False),
    Column("file_signature", Text), _time("updated_at"))

phases = Table(
    "expo_phases", metadata,
    Column("key", Text, primary_key=True), Column("phase", Integer, primary_key=True, autoincrement=False),
    Column("definition", JsonText, nullable=False), _time("started_at"), _time("ended_at", nullable=True))

allocations = Table(
    "expo_allocations", metadata,
    Column("key", Text, primary_key=True), Column("phase", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, primary_key=True, autoincrement=False), _time("created_at"),
    Column("weights", JsonText, nullable=False), Column("reason", Text, nullable=False))

assignments = Table(  # the sticky record: a unit's arm for the rest of its phase
    "expo_assignments", metadata,
    Column("key", Text, primary_key=True), Column("phase", Integer, primary_key=True, autoincrement=False),
    Column("unit_id", Text, primary_key=True), Column("arm", Text, nullable=False),
    Column("probability", DOUBLE_PRECISION, nullable=False), Column("allocation_version", BigInteger, nullable=False),
    Column("first_exposure_id", Text, nullable=False), _time("created_at"))

exposures = Table(
    "expo_exposures", metadata,
    Column("exposure_id", Text, primary_key=True), _key(), _phase(), Column("arm", Text, nullable=False),
    Column("alpha", DOUBLE_PRECISION, nullable=False), Column("unit_id", Text, nullable=False),
    Column("request_id", Text, nullable=False), Column("probability", DOUBLE_PRECISION, nullable=False),
    Column("allocation_version", BigInteger, nullable=False), _time("created_at"),
    Index("expo_exposures_phase", "key", "phase", "arm"))

outcomes = Table(  # the implicit signals of one exposure
    "expo_outcomes", metadata,
    Column("exposure_id", Text, primary_key=True), Column("latency_s", DOUBLE_PRECISION),
    Column("ttft_s", DOUBLE_PRECISION), Column("output_tokens", Integer), Column("finish_reason", Text),
    Column("aborted", Integer, nullable=False), _time("created_at"))

feedback = Table(
    "expo_feedback", metadata,
    Column("exposure_id", Text, primary_key=True), Column("name", Text, primary_key=True),
    Column("value", DOUBLE_PRECISION, nullable=False), Column("comment", Text), _time("created_at"),
    _time("updated_at"))

battles = Table(
    "expo_battles", metadata,
    Column("battle_id", Text, primary_key=True), _key(), _phase(), Column("left_arm", Text, nullable=False),
    Column("right_arm", Text, nullable=False), Column("left_alpha", DOUBLE_PRECISION, nullable=False),
    Column("right_alpha", DOUBLE_PRECISION, nullable=False), Column("unit_id", Text), _time("created_at"),
    Index("expo_battles_phase", "key", "phase"))

battle_votes = Table(
    "expo_battle_votes", metadata,
    Column("battle_id", Text, primary_key=True), Column("winner", Text, nullable=False), _time("created_at"),
    _time("updated_at"))


class floor_int(FunctionElement):
    """floor(x) as an integer: the bucket of a time on the results timeline."""

    type = BigInteger()
    inherit_cache = True


@compiles(floor_int)
def _floor_int(element, compiler, **kw) -> str:
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)}) AS BIGINT)"


@compiles(floor_int, "sqlite")
def _floor_int_sqlite(element, compiler, **kw) -> str:
    # SQLite may lack FLOOR; the times are never before the origin, so truncation is the floor.
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"

