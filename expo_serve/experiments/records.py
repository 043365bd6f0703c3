"""The rows the store reads and writes, as plain dataclasses: what the service and the results
code see of the database, whichever database it is."""
from __future__ import annotations

from dataclasses import dataclass

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
class CatalogEntry:
    """An experiment as a replica keeps it: its row, its current phase and that phase's latest weights."""
    row: ExperimentRow
    phase: PhaseRow | None = None
    allocation: AllocationRow | None = None


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
