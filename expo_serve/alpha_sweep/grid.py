"""The α grid: `--alphas 0,0.1,0.3,1` or a range `0:2:0.25` (end included), checked against the α range."""
from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from ..errors import ExpoError

MAX_ALPHAS = 64  # every α multiplies the run; a longer grid is almost certainly a typo in the step


def _number(text: str, what: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ExpoError(f"--alphas: {what} {text.strip()!r} is not a number.") from None
    if not value.is_finite():
        raise ExpoError(f"--alphas: {what} {text.strip()!r} is not a finite number.")
    return value


def parse_alphas(spec: str) -> list[float]:
    """The α values of `spec`, sorted, without repeats.

    A range is stepped in decimal arithmetic, so `0:1:0.1` ends at exactly 1 (float steps would
    reach 0.30000000000000004 and could miss the end)."""
    spec = spec.strip()
    if not spec:
        raise ExpoError("--alphas is empty; give a list such as 0,0.1,0.3,1 or a range such as 0:2:0.25.")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ExpoError(f"--alphas: the range {spec!r} must be START:END:STEP, such as 0:2:0.25.")
        start, end, step = (_number(p, w) for p, w in zip(parts, ("start", "end", "step")))
        if step <= 0:
            raise ExpoError(f"--alphas: the step of {spec!r} must be positive.")
        if end < start:
            raise ExpoError(f"--alphas: the range {spec!r} ends before it starts.")
        count = int((end - start) / step) + 1
        if count > MAX_ALPHAS:
            raise ExpoError(f"--alphas: the range {spec!r} has {count} values; at most {MAX_ALPHAS} are allowed.")
        values = [start + i * step for i in range(count)]
    else:
        values = [_number(p, "value") for p in spec.split(",") if p.strip()]
        if not values:
            raise ExpoError("--alphas is empty; give a list such as 0,0.1,0.3,1 or a range such as 0:2:0.25.")
    alphas = sorted({float(v) for v in values})
    if len(alphas) > MAX_ALPHAS:
        raise ExpoError(f"--alphas has {len(alphas)} values; at most {MAX_ALPHAS} are allowed.")
    return alphas


def with_control(alphas: list[float]) -> list[float]:
    """The grid with α = 0 (θ_aligned, the control every α is compared with) in it."""
    return sorted(set(alphas) | {0.0})


def check_range(alphas: list[float], low: float, high: float) -> None:
    """Refuse an α the engine (and a server started with the same range) would not serve."""
    outside = [a for a in alphas if not (low <= a <= high) or not math.isfinite(a)]
    if outside:
        raise ExpoError(f"α = {outside[0]:g} is outside the served range [{low:g}, {high:g}]; "
                        "widen it with --alpha-min/--alpha-max (and pass the same to `expo-serve serve`).")
    if len(alphas) < 2:
        raise ExpoError("--alphas needs at least one α besides 0 (the control).")
