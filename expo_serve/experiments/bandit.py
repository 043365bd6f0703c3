"""Thompson allocation: weights are the posterior probability that each arm is best.

Randomised probability matching: assigning each new unit to arm i with probability P(i is best)
is Thompson sampling in expectation, and unlike per-request posterior draws it gives one logged
weight vector per schedule slot, so every exposure's assignment probability is known. A burn-in
keeps the configured weights until every arm has data, and a floor keeps every arm alive so its
estimate keeps improving and the sample-ratio check stays meaningful.
"""
from __future__ import annotations

from typing import Sequence

from .config import Experiment
from .stats import MetricSummary, probability_best


def schedule_slot(now: float, every_s: float) -> int:
    """The slot a time falls in; all replicas agree on it, so they recompute at the same moments."""
    return int(now // every_s)


def floored(probabilities: Sequence[float], floor: float) -> list[float]:
    """floor + (1 − k·floor)·p: every weight ≥ floor, the sum stays 1, the order is kept."""
    k = len(probabilities)
    return [floor + (1 - k * floor) * p for p in probabilities]


def thompson_weights(experiment: Experiment, primary: Sequence[MetricSummary]) -> tuple[dict[str, float], str]:
    """New weights for a running Thompson experiment, and the reason logged with them."""
    names = [arm.name for arm in experiment.arms]
    settings = experiment.thompson
    least = min(summary.units for summary in primary)
    if least < max(settings.burn_in, 2):
        return experiment.fixed_weights(), f"burn-in: {least} of {settings.burn_in} units in the smallest arm"
    spec = experiment.metric_spec(experiment.primary_metric)
    higher = spec.higher_is_better if spec is not None else True
    p_best = probability_best(primary, higher_is_better=higher)
    if p_best is None:
        return experiment.fixed_weights(), "no posterior yet for some arm"
    weights = floored(p_best, settings.floor)
    return dict(zip(names, weights)), "thompson: P(best) of " + experiment.primary_metric + f" with floor {settings.floor}"
