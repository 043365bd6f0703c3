"""What happened after an exposure: the implicit signals the server records when a request ends
(latency, time to first token, length, finish reason, abort) and the feedback users send.

Both are validated here, before the store, so a bad value is a 400 naming its field; both are
durable when their coroutine returns, and sending one again replaces it.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from .config import IMPLICIT_METRICS, METRIC_NAME
from .errors import ExperimentError
from .records import FeedbackTarget
from .store import ExperimentStore

MAX_COMMENT = 4000


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


async def record_outcome(store: ExperimentStore, exposure_id: str, *, latency_s: float | None, ttft_s: float | None,
                         output_tokens: int | None, finish_reason: str | None, aborted: bool, now: float) -> None:
    for name, value in (("latency_s", latency_s), ("ttft_s", ttft_s), ("output_tokens", output_tokens)):
        if value is not None and (not is_finite_number(value) or value < 0):
            raise ExperimentError(f"`{name}` must be a finite number ≥ 0.", param=name, code="invalid_value")
    if finish_reason is not None and (not isinstance(finish_reason, str) or len(finish_reason) > 32):
        raise ExperimentError("`finish_reason` must be a short string.", param="finish_reason", code="invalid_value")
    await store.record_outcome(exposure_id, None if latency_s is None else float(latency_s),
                               None if ttft_s is None else float(ttft_s),
                               None if output_tokens is None else int(output_tokens),
                               finish_reason, bool(aborted), now)


async def record_feedback(store: ExperimentStore, metric_kind: Callable[[str, str], str | None], exposure_id: str,
                          name: str, value: float | bool, comment: str | None, now: float) -> dict:
    """`metric_kind(experiment_key, name)`: the metric's kind in that experiment ("binary", …) or None."""
    if not isinstance(exposure_id, str) or not exposure_id:
        raise ExperimentError("`exposure_id` must be a non-empty string.", param="exposure_id", code="invalid_value")
    if not isinstance(name, str) or not re.match(METRIC_NAME, name):
        raise ExperimentError("`name` must be a metric name (a letter, then letters, digits, '_', '.', '-').",
                              param="name", code="invalid_value")
    if name in IMPLICIT_METRICS:
        raise ExperimentError(f"`{name}` is recorded by the server itself and cannot be sent as feedback.",
                              param="name", code="reserved_metric")
    if isinstance(value, bool):
        value = int(value)
    if not is_finite_number(value):
        raise ExperimentError("`value` must be a finite number (thumbs: 0 or 1).", param="value", code="invalid_value")
    if comment is not None and not isinstance(comment, str):
        raise ExperimentError("`comment` must be a string.", param="comment", code="invalid_value")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise ExperimentError(f"`comment` must be at most {MAX_COMMENT} characters.",
                              param="comment", code="invalid_value")
    value = float(value)

    def check(key: str, _phase: int) -> None:
        # Known only once the store has found the exposure's experiment, inside the write.
        if metric_kind(key, name) == "binary" and value not in (0.0, 1.0):
            raise ExperimentError(f"`{name}` is a binary metric: `value` must be 0 or 1.", param="value",
                                  code="invalid_value")

    target: FeedbackTarget = await store.upsert_feedback(exposure_id, name, value, comment, now, check)
    return {"exposure_id": exposure_id, "name": name, "value": value, "experiment": target.key,
            "phase": target.phase, "arm": target.arm, "replaced": target.replaced}
