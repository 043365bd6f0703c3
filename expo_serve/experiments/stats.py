"""The statistics behind the results route. Pure functions on per-unit sums; no storage, no I/O.

Every metric arrives as one (sum, count) pair per unit (a user, or a request), because repeated
observations of one user are correlated: the unit, not the observation, is the independent draw.

- Per-arm mean: the ratio Σsum / Σcount, with a delta-method (cluster-robust) variance; when
  each unit has one observation this is the ordinary s²/n. Interval: Wilson for binary metrics
  (with the effective sample size p(1-p)/Var when units repeat), Student t for numeric ones.
- Lift against control: an always-valid interval (the normal-mixture sequential probability ratio
  test of Johari et al., "Always Valid Inference", 2017; Howard et al. 2021), so reading the
  results at any time, as often as wanted, keeps the error rate. Bonferroni across treatment arms.
- P(best): Monte Carlo from each arm's posterior (Beta for binary, Student t for numeric) with a
  fixed seed, so the same data always gives the same number.
- Sample-ratio mismatch: Pearson chi-square of units per arm against the logged allocation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import special  # not scipy.stats: it takes seconds to import, and the server imports this

Kind = Literal["binary", "numeric"]
SRM_THRESHOLD = 0.001
PBEST_DRAWS = 20_000
PBEST_SEED = 20240417  # fixed: the same data must always give the same P(best)


@dataclass(frozen=True)
class MetricSummary:
    kind: Kind
    n: int                       # observations
    units: int                   # units with at least one observation
    mean: float | None
    var_mean: float | None       # variance of `mean` as an estimator
    ci: tuple[float, float] | None
    n_eff: float | None = None   # binary: effective number of independent 0/1 observations


def wilson_interval(successes: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (n may be an effective, non-integer size)."""
    if n <= 0:
        return (0.0, 1.0)
    z = special.ndtri(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_interval(mean: float, var_mean: float, df: int, level: float = 0.95) -> tuple[float, float]:
    half = special.stdtrit(df, 0.5 + level / 2) * math.sqrt(var_mean)
    return (mean - half, mean + half)


def infer_kind(sums: np.ndarray, counts: np.ndarray) -> Kind:
    """Binary when every unit has one observation that is 0 or 1; else numeric."""
    if len(sums) and np.all(counts == 1) and np.all((sums == 0) | (sums == 1)):
        return "binary"
    return "numeric"


def summarize(sums: Sequence[float], counts: Sequence[float], kind: Kind, level: float = 0.95) -> MetricSummary:
    """Mean, its variance and interval from per-unit (sum, count) pairs (units with count 0 dropped)."""
    sums = np.asarray(sums, dtype=float)
    counts = np.asarray(counts, dtype=float)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    units, n = len(sums), int(counts.sum())
    if units == 0:
        return MetricSummary(kind, 0, 0, None, None, None, 0.0 if kind == "binary" else None)
    mean = float(sums.sum() / counts.sum())
    clustered = bool(np.any(counts != 1))
    if units < 2:
        var_mean = None
    elif clustered:
        # Delta method for a ratio of means: Var ≈ Σ(S_i − m·N_i)² / (k(k−1)·N̄²).
        residuals = sums - mean * counts
        mean_count = counts.mean()
        var_mean = float((residuals ** 2).sum() / (units * (units - 1) * mean_count ** 2))
    elif kind == "binary":
        var_mean = mean * (1 - mean) / n
    else:
        var_mean = float(np.var(sums, ddof=1) / n)

    if kind == "binary":
        if clustered and var_mean and var_mean > 0:
            n_eff = min(float(n), mean * (1 - mean) / var_mean) if 0 < mean < 1 else float(units)
        else:
            n_eff = float(n) if not clustered else float(units)
        return MetricSummary(kind, n, units, mean, var_mean, wilson_interval(mean * n_eff, n_eff, level), n_eff)
    ci = t_interval(mean, var_mean, units - 1, level) if var_mean is not None else None
    return MetricSummary(kind, n, units, mean, var_mean, ci)


# --- always-valid comparison against control -------------------------------------------------

def optimal_mixture_ratio(alpha: float) -> float:
    """r = τ²/V that makes the mixture interval narrowest at variance V: the root of r = 2L + ln(1+r).

    (d/dr of (1 + 1/r)(2L + ln(1+r)) vanishes there; L = ln(1/α).)
    """
    two_l = 2 * math.log(1 / alpha)
    r = two_l
    for _ in range(100):
        r_next = two_l + math.log1p(r)
        if abs(r_next - r) < 1e-12:
            break
        r = r_next
    return r


def sequential_half_width(var: float, tau2: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate with variance `var`.

    {θ : Λ(θ) < 1/α} with Λ = sqrt(V/(V+τ²))·exp(τ²(θ̂−θ)²/(2V(V+τ²))), inverted in closed form.
    """
    return math.sqrt(var * (var + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((var + tau2) / var)))


def msprt_p_value(estimate: float, var: float, tau2: float, null: float = 0.0) -> float:
    """min(1, 1/Λ): rejecting when it is ≤ α, at any time, keeps the type-I error at α."""
    log_lambda = 0.5 * math.log(var / (var + tau2)) + tau2 * (estimate - null) ** 2 / (2 * var * (var + tau2))
    return float(min(1.0, math.exp(-log_lambda)))


@dataclass(frozen=True)
class Lift:
    diff: float
    diff_ci: tuple[float, float]
    relative: float | None
    relative_ci: tuple[float, float] | None
    p_value: float


def comparison_variance(summary: MetricSummary) -> float | None:
    """Variance of an arm's mean as the comparison uses it.

    Binary arms use the Agresti–Caffo adjusted proportion (s+1)/(n+2), so that 0 of 20 against
    0 of 20 is not read as a certainty of no difference.
    """
    if summary.mean is None or summary.units < 2:
        return None
    if summary.kind == "binary":
        n_eff = summary.n_eff or 0.0
        adjusted = (summary.mean * n_eff + 1) / (n_eff + 2)
        return adjusted * (1 - adjusted) / n_eff
    return summary.var_mean


def compare(control: MetricSummary, treatment: MetricSummary, alpha: float, tuning_n: int) -> Lift | None:
    """Always-valid interval for treatment − control (absolute and relative) at level 1 − alpha.

    The mixture variance τ² is set so the interval is tightest when both arms hold `tuning_n`
    units, using the pooled per-unit variance observed so far.
    """
    var_c, var_t = comparison_variance(control), comparison_variance(treatment)
    if var_c is None or var_t is None:
        return None
    diff = treatment.mean - control.mean
    var = var_c + var_t
    if var <= 0:  # two constant numeric arms: the difference is known exactly
        return Lift(diff, (diff, diff), diff / control.mean if control.mean else None,
                    (diff / control.mean,) * 2 if control.mean else None, 0.0 if diff else 1.0)
    # Pooled per-unit variance (an arm's per-unit variance is var_mean · units).
    unit_var = (var_c * control.units ** 2 + var_t * treatment.units ** 2) / (control.units + treatment.units)
    tau2 = optimal_mixture_ratio(alpha) * unit_var * 2 / tuning_n
    half = sequential_half_width(var, tau2, alpha)
    relative = relative_ci = None
    if abs(control.mean) > 1e-12:
        relative = diff / control.mean
        # Delta method for (m_t / m_c − 1).
        var_rel = var_t / control.mean ** 2 + treatment.mean ** 2 * var_c / control.mean ** 4
        half_rel = sequential_half_width(var_rel, tau2 / control.mean ** 2, alpha)
        relative_ci = (relative - half_rel, relative + half_rel)
    return Lift(diff, (diff - half, diff + half), relative, relative_ci, msprt_p_value(diff, var, tau2))


# --- probability of being best ---------------------------------------------------------------

def posterior_draws(summary: MetricSummary, draws: int, rng: np.random.Generator) -> np.ndarray | None:
    """Beta(1 + successes, 1 + failures) for binary; mean + SE·t_{k−1} for numeric."""
    if summary.kind == "binary":
        n_eff = summary.n_eff or 0.0
        p = summary.mean or 0.0
        return rng.beta(1 + p * n_eff, 1 + (1 - p) * n_eff, size=draws)
    if summary.mean is None or summary.var_mean is None:
        return None
    return summary.mean + math.sqrt(summary.var_mean) * rng.standard_t(summary.units - 1, size=draws)


def probability_best(summaries: Sequence[MetricSummary], higher_is_better: bool = True,
                     draws: int = PBEST_DRAWS, seed: int = PBEST_SEED) -> list[float] | None:
    """P(arm i is best) for every arm, or None when some arm has no posterior yet."""
    rng = np.random.default_rng(seed)
    samples = []
    for summary in summaries:
        draw = posterior_draws(summary, draws, rng)
        if draw is None:
            return None
        samples.append(draw)
    matrix = np.vstack(samples)
    best = matrix.argmax(axis=0) if higher_is_better else matrix.argmin(axis=0)
    return (np.bincount(best, minlength=len(summaries)) / draws).tolist()


# --- sample-ratio mismatch -------------------------------------------------------------------

def srm_p_value(observed: Sequence[float], expected: Sequence[float]) -> float | None:
    """Pearson chi-square p-value of observed unit counts against expected counts (same total).

    Arms expected to get nobody are left out; with fewer than two arms left, or nobody yet, None.
    """
    obs = np.asarray(observed, dtype=float)
    exp = np.asarray(expected, dtype=float)
    keep = exp > 0
    if obs.sum() <= 0:
        return None
    if np.any(obs[~keep] > 0):
        return 0.0  # units reached an arm that should have none: the split is broken
    if keep.sum() < 2:
        return None
    obs, exp = obs[keep], exp[keep]
    exp = exp * obs.sum() / exp.sum()
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return float(special.chdtrc(len(obs) - 1, chi2))


# --- guardrails and the decision -------------------------------------------------------------

def guardrail_status(lift: Lift | None, max_increase: float | None, max_decrease: float | None) -> str:
    """'violated' when the interval lies wholly past a bound, 'at_risk' when only the estimate does."""
    if lift is None or lift.relative is None or lift.relative_ci is None:
        return "no_data"
    lo, hi = lift.relative_ci
    if (max_increase is not None and lo > max_increase) or (max_decrease is not None and hi < -max_decrease):
        return "violated"
    if (max_increase is not None and lift.relative > max_increase) or (max_decrease is not None and lift.relative < -max_decrease):
        return "at_risk"
    return "ok"


@dataclass
class Decision:
    status: Literal["srm", "collecting", "no_winner_yet", "guardrail", "winner"]
    winner: str | None
    leader: str | None
    reason: str
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"status": self.status, "winner": self.winner, "leader": self.leader, "reason": self.reason}


def decide(names: Sequence[str], control: str, primary_units: Sequence[int], p_best: Sequence[float] | None,
           lifts: dict[str, Lift | None], higher_is_better: bool, srm_p: float | None, min_sample: int,
           p_best_threshold: float, guardrail_violations: dict[str, list[str]]) -> Decision:
    """Name a winner only when the split is healthy, every arm has min_sample units, the leader's
    P(best) clears the threshold and its always-valid intervals against control agree."""
    if srm_p is not None and srm_p < SRM_THRESHOLD:
        return Decision("srm", None, None, f"sample ratio mismatch (p = {srm_p:.2g} < {SRM_THRESHOLD}): "
                        "the split is broken, so no winner is shown")
    short = [name for name, units in zip(names, primary_units) if units < min_sample]
    if short or p_best is None:
        return Decision("collecting", None, None,
                        f"waiting for {min_sample} units with the primary metric in every arm "
                        f"({', '.join(short) or 'all arms'} below)")
    leader = names[int(np.argmax(p_best))]
    leader_p = max(p_best)

    def beats_control(lift: Lift | None) -> bool:
        return lift is not None and (lift.diff_ci[0] > 0 if higher_is_better else lift.diff_ci[1] < 0)

    def loses_to_control(lift: Lift | None) -> bool:
        return lift is not None and (lift.diff_ci[1] < 0 if higher_is_better else lift.diff_ci[0] > 0)

    if leader == control:
        separated = all(loses_to_control(lifts.get(name)) for name in names if name != control)
    else:
        separated = beats_control(lifts.get(leader))
    if not separated or leader_p < p_best_threshold:
        return Decision("no_winner_yet", None, leader,
                        f"{leader} leads with P(best) = {leader_p:.3f}, but its always-valid interval "
                        "against control does not yet exclude no difference" if not separated else
                        f"{leader} leads but P(best) = {leader_p:.3f} is below {p_best_threshold}")
    violations = guardrail_violations.get(leader, [])
    if violations:
        return Decision("guardrail", None, leader, f"{leader} is better on the primary metric but fails "
                        f"the guardrail on {', '.join(violations)}")
    return Decision("winner", leader, leader, f"{leader} is best with P(best) = {leader_p:.3f} and an "
                    "always-valid interval against control that excludes no difference")
