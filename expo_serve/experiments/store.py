"""What the experiments subsystem stores, behind one interface, and `open_store(url)`.

Two backends share one SQL implementation (store_sql.py): SQLite in WAL mode for one process,
PostgreSQL for several replicas. Every write goes through one batched writer thread and its
awaitable resolves only after the commit, so what the server acknowledges is durable.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ExpoError
from ..paths import expo_home
from .battles import Battle


@dataclass
class ExperimentRow:
    key: str
    definition: dict
    status: str
    phase: int
    is_default: bool
    file_signature: str | None
    updated_at: float


@dataclass
class PhaseRow:
    key: str
    phase: int
    definition: dict
    started_at: float
    ended_at: float | None = None


@dataclass
class AllocationRow:
    version: int
    created_at: float
    weights: dict[str, float]
    reason: str


@dataclass
class ExperimentChange:
    """One admin edit, written in one transaction."""
    row: ExperimentRow
    start_phase: PhaseRow | None = None          # a new phase begins (with its first allocation)
    initial_allocation: AllocationRow | None = None
    end_phase_at: float | None = None            # the previous current phase ends
    ended_phase: int | None = None
    update_phase_definition: bool = False        # same phase, analysis settings changed
    clear_other_defaults: bool = False


@dataclass
class StoredAssignment:
    arm: str
    probability: float
    allocation_version: int
    first_exposure: bool


@dataclass
class PhaseData:
    exposures: dict[str, int]                      # arm -> exposures
    units: list[tuple[str, int, int]]              # (arm, allocation_version, units first exposed then)
    metric_rows: list[tuple[str, str, str, float, int]]     # (arm, unit, metric, sum, count)
    timeline_rows: list[tuple[str, str, int, float, int]]   # (arm, unit, bucket, sum, count): primary metric
    battles: list[Battle]
    allocations: list[AllocationRow]
    first_exposure_at: float | None = None
    last_exposure_at: float | None = None
    timeline_origin: float = 0.0                   # timeline_rows' bucket b covers origin + [b, b+1)·width
    timeline_width: float = 1.0


@dataclass
class FeedbackTarget:
    key: str
    phase: int
    arm: str
    replaced: bool = False


@dataclass
class BattleRow:
    battle_id: str
    key: str
    phase: int
    left_arm: str
    right_arm: str
    left_alpha: float
    right_alpha: float
    winner: str | None = None
    extra: dict = field(default_factory=dict)


class ExperimentStore(abc.ABC):
    """Durable state of experiments. Writes resolve after commit; reads see committed data."""

    url: str

    @abc.abstractmethod
    async def start(self) -> None: ...
    @abc.abstractmethod
    async def close(self) -> None: ...

    # experiments, phases, allocations
    @abc.abstractmethod
    async def load_experiments(self) -> list[ExperimentRow]: ...
    @abc.abstractmethod
    async def load_phase(self, key: str, phase: int) -> PhaseRow | None: ...
    @abc.abstractmethod
    async def apply_change(self, change: ExperimentChange) -> None: ...
    @abc.abstractmethod
    async def add_allocation(self, key: str, phase: int, allocation: AllocationRow) -> bool: ...
    @abc.abstractmethod
    async def load_allocations(self, key: str, phase: int) -> list[AllocationRow]: ...

    # the request path
    @abc.abstractmethod
    async def assign(self, key: str, phase: int, unit_id: str, arm: str, probability: float,
                     allocation_version: int, exposure_id: str, request_id: str,
                     alphas: dict[str, float], now: float) -> StoredAssignment: ...
    @abc.abstractmethod
    async def record_outcome(self, exposure_id: str, latency_s: float | None, ttft_s: float | None,
                             output_tokens: int | None, finish_reason: str | None, aborted: bool, now: float) -> None: ...
    @abc.abstractmethod
    async def upsert_feedback(self, exposure_id: str, name: str, value: float, comment: str | None, now: float,
                              check: Callable[[str, int], None]) -> FeedbackTarget: ...

    # battles
    @abc.abstractmethod
    async def create_battle(self, battle: BattleRow, unit_id: str | None, now: float) -> None: ...
    @abc.abstractmethod
    async def vote(self, battle_id: str, winner: str, now: float) -> BattleRow: ...

    # analysis
    @abc.abstractmethod
    async def phase_data(self, key: str, phase: int, primary_metric: str, timeline_origin: float | None,
                         timeline_points: int) -> PhaseData: ...
    @abc.abstractmethod
    async def exposure(self, exposure_id: str) -> dict | None: ...


def default_db_url() -> str:
    return f"sqlite:///{expo_home() / 'experiments.db'}"


def open_store(url: str | None = None) -> ExperimentStore:
    """`sqlite:///path` (default: under EXPO_HOME) or `postgresql://…` (psycopg 3 required)."""
    url = url or default_db_url()
    if url.startswith("sqlite:///"):
        from .store_sqlite import SqliteStore

        path = url[len("sqlite:///"):]
        if not path:
            raise ExpoError("A sqlite URL needs a path: sqlite:///path/to/experiments.db.")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresStore

        return PostgresStore(url)
    raise ExpoError(f"Unsupported --db URL {url!r}: use sqlite:///path or postgresql://user@host/dbname.")
