"""Which arm a unit gets, and the exposure that records it.

The arm comes from GrowthBook's v2 hash of the unit under the phase's seed, so replicas agree
without shared state; the store pins it with a sticky record written with the unit's first
exposure, and later exposures follow that record (the weights may have moved since).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import ExperimentError
from .hashing import bucket_ranges, choose_variation, gb_hash

if TYPE_CHECKING:
    from .catalog import LiveExperiment
    from .store import ExperimentStore

MAX_UNIT_ID = 256


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


def choose_arm(seed: str, unit_id: str, arm_names: Sequence[str], weights: dict[str, float]) -> str:
    """The arm whose slice of [0, 1) holds hash(seed, unit): the same answer on every replica.

    Weights are normalised here, so the reference's fall-back to equal weights never triggers; a
    point past the last slice (the sum rounding just below 1) belongs to the last arm.
    """
    raw = [max(float(weights.get(name, 0.0)), 0.0) for name in arm_names]
    total = sum(raw)
    if total <= 0:
        raise ValueError("at least one arm needs a positive weight")
    normalised = [w / total for w in raw]
    n = gb_hash(seed, unit_id, 2)
    index = choose_variation(n, bucket_ranges(len(arm_names), 1.0, normalised))
    if index < 0:
        index = max(i for i, w in enumerate(normalised) if w > 0)
    return arm_names[index]


def unit_of(state: "LiveExperiment", unit_id: str | None, request_id: str, named: bool) -> str | None:
    """The assignment unit of a request; None when a default experiment does not apply to it."""
    experiment = state.definition
    if experiment.unit == "request":
        unit = request_id
    elif unit_id is None or unit_id == "":
        if not named:
            return None  # the default experiment only enrols requests that name their user
        raise ExperimentError(f"Experiment {experiment.key!r} assigns per user: pass `user` or the "
                              "X-ExPO-Unit header.", param="user", code="missing_unit")
    else:
        unit = unit_id
    if not isinstance(unit, str) or len(unit) > MAX_UNIT_ID:
        raise ExperimentError(f"The unit id must be a string of at most {MAX_UNIT_ID} characters.",
                              param="user", code="invalid_unit")
    return unit


async def log_exposure(store: "ExperimentStore", state: "LiveExperiment", unit: str, request_id: str,
                       now: float) -> Assignment:
    """Choose the unit's arm and log the exposure durably (committed when this returns)."""
    experiment = state.definition
    weights = state.weights()
    version = state.allocation.version if state.allocation else 0
    seed = f"{experiment.seed or experiment.key}:{state.phase}"
    arm = choose_arm(seed, unit, [a.name for a in experiment.arms], weights)
    exposure_id = "exp_" + uuid.uuid4().hex
    stored = await store.assign(experiment.key, state.phase, unit, arm, weights[arm], version, exposure_id,
                                request_id, {a.name: a.alpha for a in experiment.arms}, now)
    alpha = experiment.arm(stored.arm).alpha
    return Assignment(experiment.key, stored.arm, alpha, state.phase, stored.probability, exposure_id, unit,
                      stored.first_exposure)
