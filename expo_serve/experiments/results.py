"""The results document of `GET /v1/experiments/{key}/results`: one phase's stored rows, read and
turned into per-arm estimates, lifts, guardrails, the decision, battles and the timeline."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from . import stats
from .battles import battle_summary
from .catalog import LiveExperiment
from .config import Experiment, parse_experiment
from .errors import ExperimentError
from .records import PhaseData
from .store import ExperimentStore

TIMELINE_POINTS = 24


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else float(round(x, digits))


def _interval(ci) -> list[float] | None:
    return None if ci is None else [_round(ci[0]), _round(ci[1])]


def metric_names(experiment: Experiment, observed: Sequence[str]) -> list[str]:
    """Primary first, then guardrail metrics, then everything else that has data, alphabetically."""
    ordered = [experiment.primary_metric] + [g.metric for g in experiment.guardrails]
    ordered += sorted(set(observed) - set(ordered))
    seen, names = set(), []
    for name in ordered:
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def unit_arrays(rows, arm_names) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """metric -> arm -> (per-unit sums, per-unit counts)."""
    grouped: dict[str, dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    for arm, _unit, metric, total, count in rows:
        grouped[metric][arm].append((total, count))
    out = {}
    for metric, by_arm in grouped.items():
        out[metric] = {}
        for arm in arm_names:
            pairs = by_arm.get(arm, [])
            out[metric][arm] = (np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float))
    return out


def metric_kind(experiment: Experiment, name: str, per_arm: dict[str, tuple[np.ndarray, np.ndarray]]) -> stats.Kind:
    spec = experiment.metric_spec(name)
    if spec is not None:
        return spec.kind
    sums = np.concatenate([v[0] for v in per_arm.values()]) if per_arm else np.array([])
    counts = np.concatenate([v[1] for v in per_arm.values()]) if per_arm else np.array([])
    return stats.infer_kind(sums, counts)


def higher_is_better(experiment: Experiment, name: str) -> bool:
    spec = experiment.metric_spec(name)
    return True if spec is None else spec.higher_is_better


def primary_summaries(experiment: Experiment, data: PhaseData) -> list[stats.MetricSummary]:
    """Per-arm summaries of the primary metric (what the bandit needs)."""
    names = [arm.name for arm in experiment.arms]
    arrays = unit_arrays([r for r in data.metric_rows if r[2] == experiment.primary_metric], names)
    per_arm = arrays.get(experiment.primary_metric, {name: (np.array([]), np.array([])) for name in names})
    kind = metric_kind(experiment, experiment.primary_metric, per_arm)
    return [stats.summarize(*per_arm[name], kind) for name in names]


def expected_units(names: Sequence[str], data: PhaseData) -> list[float]:
    """Units each arm should have had given the allocation each unit was assigned under."""
    weights_by_version = {a.version: a.weights for a in data.allocations}
    per_version: dict[int, int] = defaultdict(int)
    for _arm, version, count in data.units:
        per_version[version] += count
    expected = [0.0] * len(names)
    for version, count in per_version.items():
        weights = weights_by_version.get(version)
        if weights is None:
            continue
        total = sum(weights.get(name, 0.0) for name in names)
        for i, name in enumerate(names):
            expected[i] += count * weights.get(name, 0.0) / total
    return expected


def lift_alpha(experiment: Experiment) -> float:
    """Per-comparison level of the lift intervals: Bonferroni over the treatment arms."""
    return experiment.significance / max(len(experiment.arms) - 1, 1)


def primary_decision(experiment: Experiment, primary: dict[str, stats.MetricSummary], srm_p: float | None,
                     violations: dict[str, list[str]], draws: int = stats.PBEST_DRAWS
                     ) -> tuple[stats.Decision, list[float] | None, dict[str, stats.Lift | None]]:
    """The decision on the primary metric: lifts against control, P(best), and the verdict."""
    names = [arm.name for arm in experiment.arms]
    control = experiment.control.name
    lifts = {name: stats.compare(primary[control], primary[name], lift_alpha(experiment), experiment.sequential_tuning_n)
             for name in names if name != control}
    higher = higher_is_better(experiment, experiment.primary_metric)
    p_best = stats.probability_best([primary[name] for name in names], higher_is_better=higher, draws=draws)
    decision = stats.decide(names, control, [primary[name].units for name in names], p_best, lifts, higher, srm_p,
                            experiment.min_sample, experiment.p_best_threshold, violations)
    return decision, p_best, lifts


async def read_results(store: ExperimentStore, state: LiveExperiment, phase: int | None, now: float, *,
                       timeline: bool = False) -> dict:
    """The results of a phase (default: the current one); a past phase is analysed as it was defined."""
    key = state.definition.key
    phase = state.phase if phase is None else phase
    if state.phase == 0:
        raise ExperimentError(f"Experiment {key!r} has not started, so it has no results yet.",
                              code="experiment_not_started", param="phase")
    if not isinstance(phase, int) or not 1 <= phase <= state.phase:
        raise ExperimentError(f"Experiment {key!r} has phases 1 to {state.phase}.", status=404,
                              code="phase_not_found", param="phase")
    phase_row = await store.load_phase(key, phase)
    if phase == state.phase:
        experiment, weights = state.definition, state.weights()
    else:
        experiment = parse_experiment(phase_row.definition)
        allocations = await store.load_allocations(key, phase)
        weights = allocations[-1].weights if allocations else None
    end = phase_row.ended_at if phase_row and phase_row.ended_at is not None else now
    started = phase_row.started_at if phase_row else None
    data = await store.phase_data(key, phase, experiment.primary_metric, started, TIMELINE_POINTS)
    status = state.status if phase == state.phase else "ended"
    return build_results(experiment, phase=phase, status=status, data=data, now=end, phase_started_at=started,
                         current_weights=weights, timeline=timeline)


def build_results(experiment: Experiment, *, phase: int, status: str, data: PhaseData, now: float,
                  phase_started_at: float | None, current_weights: dict[str, float] | None,
                  timeline: bool = False) -> dict:
    names = [arm.name for arm in experiment.arms]
    control = experiment.control.name
    units_by_arm: dict[str, int] = defaultdict(int)
    for arm, _version, count in data.units:
        units_by_arm[arm] += count

    arrays = unit_arrays(data.metric_rows, names)
    metrics = metric_names(experiment, arrays.keys())
    comparisons = max(len(names) - 1, 1)
    alpha_each = lift_alpha(experiment)

    summaries: dict[str, dict[str, stats.MetricSummary]] = {}
    lifts: dict[str, dict[str, stats.Lift | None]] = {}
    for metric in metrics:
        per_arm = arrays.get(metric, {name: (np.array([]), np.array([])) for name in names})
        kind = metric_kind(experiment, metric, per_arm)
        summaries[metric] = {name: stats.summarize(*per_arm[name], kind) for name in names}
        lifts[metric] = {name: stats.compare(summaries[metric][control], summaries[metric][name], alpha_each,
                                             experiment.sequential_tuning_n)
                         for name in names if name != control}

    primary = experiment.primary_metric
    observed_units = [units_by_arm.get(name, 0) for name in names]
    srm_p = stats.srm_p_value(observed_units, expected_units(names, data))

    guardrails: dict[str, list[dict]] = {}
    violations: dict[str, list[str]] = {}
    for name in names:
        if name == control:
            continue
        guardrails[name] = []
        for g in experiment.guardrails:
            lift = lifts.get(g.metric, {}).get(name)
            state = stats.guardrail_status(lift, g.max_increase, g.max_decrease)
            guardrails[name].append({
                "metric": g.metric, "status": state, "max_increase": g.max_increase, "max_decrease": g.max_decrease,
                "relative": _round(lift.relative) if lift else None,
                "relative_ci": _interval(lift.relative_ci) if lift else None})
            if state == "violated":
                violations.setdefault(name, []).append(g.metric)

    decision, p_best, _ = primary_decision(experiment, summaries[primary], srm_p, violations)

    arms_out = []
    for i, arm in enumerate(experiment.arms):
        exposures = data.exposures.get(arm.name, 0)
        metric_out = {}
        for metric in metrics:
            s = summaries[metric][arm.name]
            entry = {"kind": s.kind, "n": s.n, "units": s.units, "mean": _round(s.mean), "ci": _interval(s.ci),
                     "coverage": _round(s.n / exposures, 4) if exposures else None,
                     "higher_is_better": higher_is_better(experiment, metric)}
            lift = lifts[metric].get(arm.name)
            if arm.name != control:
                entry["lift"] = None if lift is None else {
                    "diff": _round(lift.diff), "diff_ci": _interval(lift.diff_ci), "relative": _round(lift.relative),
                    "relative_ci": _interval(lift.relative_ci), "p_value": _round(lift.p_value),
                    "significant": lift.diff_ci[0] > 0 or lift.diff_ci[1] < 0}
            metric_out[metric] = entry
        arms_out.append({
            "name": arm.name, "alpha": arm.alpha, "control": arm.control,
            "weight": _round((current_weights or experiment.fixed_weights()).get(arm.name)),
            "units": units_by_arm.get(arm.name, 0), "exposures": exposures,
            "p_best": None if p_best is None else _round(p_best[i], 4),
            "metrics": metric_out,
            "guardrails": guardrails.get(arm.name, []),
        })

    result = {
        "key": experiment.key, "phase": phase, "status": status, "unit": experiment.unit,
        "allocation": experiment.allocation, "primary_metric": primary, "generated_at": now,
        "phase_started_at": phase_started_at, "first_exposure_at": data.first_exposure_at,
        "last_exposure_at": data.last_exposure_at,
        "srm_p": _round(srm_p), "srm_flagged": srm_p is not None and srm_p < stats.SRM_THRESHOLD,
        "min_sample": experiment.min_sample, "significance": experiment.significance,
        "interval": {"per_arm": "95% (Wilson for binary metrics, Student t for numeric; cluster-robust per unit)",
                     "lift": f"always-valid normal-mixture sequential interval at {1 - alpha_each:.4g} "
                             f"(Bonferroni over {comparisons} comparison{'s' if comparisons > 1 else ''})"},
        "decision": decision.as_dict(),
        "arms": arms_out,
        "battles": battle_summary(names, data.battles),
        "weights_history": [{"version": a.version, "at": a.created_at, "weights": a.weights, "reason": a.reason}
                            for a in data.allocations],
    }
    if timeline:
        result["timeline"] = build_timeline(experiment, data)
    return result


def build_timeline(experiment: Experiment, data: PhaseData) -> dict:
    """Cumulative mean, interval and P(best) of the primary metric at the end of each step."""
    names = [arm.name for arm in experiment.arms]
    origin, width = data.timeline_origin, data.timeline_width
    points = TIMELINE_POINTS
    per_arm_rows: dict[str, list] = defaultdict(list)
    for arm, unit, bucket, total, count in data.timeline_rows:
        per_arm_rows[arm].append((unit, min(max(bucket, 0), points - 1), total, count))
    cumulative = {}
    for name in names:
        rows = per_arm_rows.get(name, [])
        units = {u: i for i, u in enumerate(sorted({r[0] for r in rows}))}
        sums = np.zeros((len(units), points))
        counts = np.zeros((len(units), points))
        for unit, bucket, total, count in rows:
            sums[units[unit], bucket] += total
            counts[units[unit], bucket] += count
        cumulative[name] = (np.cumsum(sums, axis=1), np.cumsum(counts, axis=1))
    pooled = [(cumulative[n][0][:, -1], cumulative[n][1][:, -1]) for n in names]
    spec = experiment.metric_spec(experiment.primary_metric)
    kind = spec.kind if spec else stats.infer_kind(np.concatenate([p[0] for p in pooled]), np.concatenate([p[1] for p in pooled]))
    higher = higher_is_better(experiment, experiment.primary_metric)
    out = {"metric": experiment.primary_metric, "t": [], "arms": {n: {"mean": [], "ci": [], "n": []} for n in names},
           "p_best": {n: [] for n in names}}
    for c in range(points):
        out["t"].append(round(origin + (c + 1) * width, 3))
        summaries = [stats.summarize(cumulative[n][0][:, c], cumulative[n][1][:, c], kind) for n in names]
        for name, s in zip(names, summaries):
            out["arms"][name]["mean"].append(_round(s.mean))
            out["arms"][name]["ci"].append(_interval(s.ci))
            out["arms"][name]["n"].append(s.n)
        p_best = stats.probability_best(summaries, higher_is_better=higher, draws=4000)
        for i, name in enumerate(names):
            out["p_best"][name].append(None if p_best is None else round(p_best[i], 4))
    return out
