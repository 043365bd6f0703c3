"""The bandit loop: at each schedule slot, every running Thompson experiment gets new weights from
its primary metric so far, logged as one allocation row per slot (the math is in bandit.py).

Replicas compute the same slot from the clock, and the store keeps the first row written for a
slot, so however many replicas tick, each slot has one weight vector and every exposure's
assignment probability is known.
"""
from __future__ import annotations

import logging

from . import bandit
from .catalog import LiveExperiment
from .records import AllocationRow
from .results import TIMELINE_POINTS, primary_summaries
from .store import ExperimentStore

log = logging.getLogger("expo_serve.experiments")


async def update_allocations(store: ExperimentStore, live: dict[str, LiveExperiment], now: float) -> None:
    """Recompute Thompson weights where the schedule says so, and log them (one row per slot)."""
    for key, state in list(live.items()):
        experiment = state.definition
        if state.status != "running" or experiment.allocation != "thompson":
            continue
        slot = bandit.schedule_slot(now, experiment.thompson.update_every_s)
        if state.allocation is not None and state.allocation.version >= slot:
            continue
        data = await store.phase_data(key, state.phase, experiment.primary_metric, state.phase_started_at,
                                      TIMELINE_POINTS)
        weights, reason = bandit.thompson_weights(experiment, primary_summaries(experiment, data))
        if await store.add_allocation(key, state.phase, AllocationRow(slot, now, weights, reason)):
            log.info("experiment %s phase %d: weights %s (%s)", key, state.phase,
                     {k: round(v, 4) for k, v in weights.items()}, reason)
        allocations = await store.load_allocations(key, state.phase)
        state.allocation = allocations[-1] if allocations else state.allocation
