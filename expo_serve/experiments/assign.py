"""Which arm a unit gets: GrowthBook's v2 hash of the unit under a salt, against the arm weights."""
from __future__ import annotations

from typing import Sequence

from .hashing import bucket_ranges, choose_variation, gb_hash


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
