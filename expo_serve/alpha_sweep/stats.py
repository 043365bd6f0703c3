"""Per-α statistics over prompts: bootstrap intervals, paired win rate against α = 0, length-controlled win rate.

The unit is the prompt: a prompt's n samples are averaged first, then intervals come from a
percentile bootstrap over prompts (scipy.stats.bootstrap). Every statistic of one α uses the same
seed, so the same resampled prompt sets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

from .generate import Sample

CONFIDENCE = 0.95
RESAMPLES = 10_000
LC_RIDGE = 1.0  # a weak pull of the length slope to 0: with few prompts a length split can separate wins perfectly


def bootstrap_interval(values, seed: int, n_resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; NaNs with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    if np.all(values == values[0]):  # nothing to resample: the interval is the value itself
        return float(values[0]), float(values[0])
    res = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def preference(score: float, control: float, identical: bool) -> float:
    """1 if the answer beats the α = 0 answer, 0 if it loses, 0.5 for a tie (identical answers tie
    whatever their scores: two scorings of the same tokens may differ in the last float bit)."""
    if identical or score == control:
        return 0.5
    return 1.0 if score > control else 0.0


def length_controlled_win_rate(prefs, length_diffs, ridge: float = LC_RIDGE) -> float:
    """AlpacaEval 2's idea: fit logit P(win) = b0 + b1·x on the paired preferences, x the length
    difference (standardized), and read P(win) at x = 0, i.e. σ(b0).

    A tie is half a win and half a loss (y = 0.5 in the likelihood). b1 carries a weak ridge
    penalty so that a perfect split by length stays finite; b0 is bounded to ±20 (σ = 1 − 2e-9)
    for the case where every pair is won or every pair lost."""
    y = np.asarray(prefs, dtype=np.float64)
    x = np.asarray(length_diffs, dtype=np.float64)
    if y.size == 0:
        return math.nan
    scale = x.std()
    x = x / scale if scale > 0 else np.zeros_like(x)

    def loss(b):
        z = b[0] + b[1] * x
        # −Σ [y·log σ(z) + (1−y)·log σ(−z)], written stably with logaddexp
        nll = np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))
        p = 1 / (1 + np.exp(-z))
        grad = np.array([np.sum(p - y), np.sum((p - y) * x) + ridge * b[1]])
        return nll + 0.5 * ridge * b[1] ** 2, grad

    fit = optimize.minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(-20, 20), (None, None)])
    return float(1 / (1 + math.exp(-fit.x[0])))


@dataclass
class AlphaStats:
    alpha: float
    prompts: int
    mean_score: float
    score_low: float
    score_high: float
    win_rate: float  # paired against α = 0; ties count a half
    win_low: float
    win_high: float
    lc_win_rate: float
    mean_length: float  # generated tokens
    length_low: float
    length_high: float
    beats_control: bool  # the win rate's interval lies wholly above 0.5

    def row(self) -> dict:
        return asdict(self)


def per_alpha(samples: list[Sample], alphas: list[float], n_prompts: int, pairwise: bool, seed: int = 0) -> list[AlphaStats]:
    """One AlphaStats per α. Scores are pointwise, or for a pairwise judge already the preference
    against the α = 0 answer (then they are also the win rate)."""
    by_key = {(s.prompt_index, s.alpha, s.sample): s for s in samples}
    n_samples = 1 + max(s.sample for s in samples)
    out = []
    for alpha in alphas:
        scores = np.zeros(n_prompts)
        lengths = np.zeros(n_prompts)
        wins = np.zeros(n_prompts)
        pair_prefs, pair_diffs = [], []
        for p in range(n_prompts):
            for i in range(n_samples):
                s, c = by_key[(p, alpha, i)], by_key[(p, 0.0, i)]
                pref = s.score if pairwise else preference(s.score, c.score, s.token_ids == c.token_ids)
                scores[p] += s.score / n_samples
                lengths[p] += len(s.token_ids) / n_samples
                wins[p] += pref / n_samples
                pair_prefs.append(pref)
                pair_diffs.append(len(s.token_ids) - len(c.token_ids))
        score_ci = bootstrap_interval(scores, seed)
        win_ci = bootstrap_interval(wins, seed)
        length_ci = bootstrap_interval(lengths, seed)
        out.append(AlphaStats(
            alpha=alpha, prompts=n_prompts,
            mean_score=float(scores.mean()), score_low=score_ci[0], score_high=score_ci[1],
            win_rate=float(wins.mean()), win_low=win_ci[0], win_high=win_ci[1],
            lc_win_rate=length_controlled_win_rate(pair_prefs, pair_diffs),
            mean_length=float(lengths.mean()), length_low=length_ci[0], length_high=length_ci[1],
            beats_control=alpha != 0.0 and win_ci[0] > 0.5,
        ))
    return out
