"""Battles: the win matrix, Bradley–Terry against a direct maximum-likelihood fit, bootstrap intervals."""
import numpy as np
import pytest
from scipy import optimize

from expo_serve.experiments.battles import (PRIOR_TIES, Battle, battle_summary, bootstrap_strengths,
                                            effective_wins, fit_bradley_terry, outcome_counts)


def test_win_matrix_counts_each_outcome():
    names = ["a", "b", "c"]
    battles = [Battle("a", "b", "left"), Battle("b", "a", "left"), Battle("a", "c", "right"),
               Battle("b", "c", "tie"), Battle("c", "a", "both_bad"), Battle("a", "zzz", "left")]
    wins, ties, both_bad = outcome_counts(names, battles)
    assert wins.tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert ties[1, 2] == ties[2, 1] == 1 and both_bad[0, 2] == both_bad[2, 0] == 1
    summary = battle_summary(names, battles, resamples=20)
    assert summary["count"] == 5  # the battle with an unknown arm is ignored
    assert summary["win_rate"][0][1] == 0.5 and summary["win_rate"][1][2] == 0.5


def _direct_fit(w):
    """Maximise Σ w_ij log σ(s_i − s_j) with scipy (with the same virtual ties), centred."""
    k = w.shape[0]
    w = w + PRIOR_TIES / 2 * (1 - np.eye(k))

    def nll(s):
        diff = s[:, None] - s[None, :]
        return -(w * -np.logaddexp(0, -diff)).sum()

    s = optimize.minimize(nll, np.zeros(k), method="BFGS", options={"gtol": 1e-10}).x
    return s - s.mean()


def test_mm_fit_matches_direct_maximum_likelihood():
    rng = np.random.default_rng(5)
    w = rng.integers(0, 30, size=(4, 4)).astype(float)
    np.fill_diagonal(w, 0)
    w[0, 3] = 0  # a pair where one side never won
    assert fit_bradley_terry(w) == pytest.approx(_direct_fit(w), abs=1e-5)


def test_an_undefeated_arm_keeps_a_finite_strength():
    w = np.array([[0, 10.0], [0, 0]])
    s = fit_bradley_terry(w)
    assert np.all(np.isfinite(s)) and s[0] > s[1]


def test_strengths_recovered_with_covering_intervals():
    rng = np.random.default_rng(6)
    names = ["control", "a03", "a10"]
    true = np.array([0.0, 0.6, -0.4])
    true -= true.mean()
    battles = []
    for _ in range(1500):
        i, j = rng.choice(3, size=2, replace=False)
        p = 1 / (1 + np.exp(true[j] - true[i]))
        battles.append(Battle(names[i], names[j], "left" if rng.random() < p else "right"))
    point, ci = bootstrap_strengths(names, battles, resamples=200)
    assert np.argmax(point) == 1 and np.argmin(point) == 2
    assert np.all(ci[:, 0] <= true) and np.all(true <= ci[:, 1])
    assert np.all(ci[:, 1] - ci[:, 0] < 0.4)
    # Fixed seed: the same votes give the same intervals.
    assert np.array_equal(bootstrap_strengths(names, battles, resamples=200)[1], ci)


def test_ties_count_half_each_way():
    wins, ties, both_bad = outcome_counts(["a", "b"], [Battle("a", "b", "tie"), Battle("a", "b", "both_bad")])
    assert effective_wins(wins, ties, both_bad).tolist() == [[0, 1], [1, 0]]
