"""Deterministic, salted bucketing: GrowthBook's FNV-1a hash (v1 and v2) and bucket ranges.

Every replica computes the same arm for the same (seed, unit) without shared state. The
definitions follow GrowthBook's published SDK spec, so its public test vectors apply:
  v1: fnv1a32(value + seed) % 1000 / 1000
  v2: fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000   (the outer hash spreads short ids)
"""
from __future__ import annotations

from typing import Sequence

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def fnv1a32(text: str) -> int:
    """32-bit FNV-1a over UTF-16 code units, as the JavaScript SDK (charCodeAt) does.

    For ASCII this is the textbook byte-wise FNV-1a; beyond it, matching the JS reference keeps
    assignments identical to GrowthBook's own SDKs.
    """
    value = _FNV32_OFFSET
    units = text.encode("utf-16-le")
    for i in range(0, len(units), 2):
        value ^= units[i] | (units[i + 1] << 8)
        value = (value * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def gb_hash(seed: str, value: str, version: int = 2) -> float | None:
    """A number in [0, 1) for `value` salted by `seed`; None for an unknown version."""
    if version == 2:
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    return None


def bucket_ranges(num_variations: int, coverage: float = 1.0,
                  weights: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """Consecutive [start, end) slices of [0, 1), one per variation (GrowthBook's getBucketRanges).

    Coverage is clamped to [0, 1]; weights of the wrong length, or not summing to 1 within 0.01,
    fall back to equal weights, as the reference does.
    """
    coverage = min(max(coverage, 0.0), 1.0)
    if num_variations <= 0:
        return []
    equal = [1.0 / num_variations] * num_variations
    if weights is None or len(weights) != num_variations or not 0.99 <= sum(weights) <= 1.01:
        weights = equal
    ranges, start = [], 0.0
    for weight in weights:
        ranges.append((start, start + coverage * weight))
        start += weight
    return ranges


def choose_variation(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    """Index of the range holding n, or -1 when n falls outside every range."""
    for index, (start, end) in enumerate(ranges):
        if start <= n < end:
            return index
    return -1
