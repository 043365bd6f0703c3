"""Pairwise battles: the win matrix and Bradley–Terry strengths with bootstrap intervals.

A tie, and a "both bad" vote, counts as half a win each way (as Chatbot Arena treats them).
Strengths are fitted by Hunter's MM algorithm (2004) with a small symmetric prior (virtual ties
between every pair of arms), which keeps them finite when an arm has won or lost every battle and
defined for arms that have not met yet. Reported as log-strengths centred on zero, so that
P(i beats j) = 1 / (1 + exp(s_j − s_i)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

OUTCOMES = ("left", "right", "tie", "both_bad")
BOOTSTRAP_SEED = 7
PRIOR_TIES = 0.5  # virtual comparisons per pair, split as half a win each way


@dataclass(frozen=True)
class Battle:
    left: str
    right: str
    winner: str  # one of OUTCOMES


def outcome_counts(names: Sequence[str], battles: Sequence[Battle]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """wins[i, j]: i beat j; ties[i, j] (symmetric): ties; both_bad[i, j] (symmetric)."""
    index = {name: i for i, name in enumerate(names)}
    k = len(names)
    wins, ties, both_bad = np.zeros((k, k)), np.zeros((k, k)), np.zeros((k, k))
    for battle in battles:
        if battle.left not in index or battle.right not in index or battle.left == battle.right:
            continue
        i, j = index[battle.left], index[battle.right]
        if battle.winner == "left":
            wins[i, j] += 1
        elif battle.winner == "right":
            wins[j, i] += 1
        elif battle.winner == "tie":
            ties[i, j] += 1
            ties[j, i] += 1
        elif battle.winner == "both_bad":
            both_bad[i, j] += 1
            both_bad[j, i] += 1
    return wins, ties, both_bad


def fit_bradley_terry(wins: np.ndarray, prior: float = PRIOR_TIES, tol: float = 1e-10, max_iter: int = 10_000) -> np.ndarray:
    """Centred log-strengths from an effective win matrix (ties already split in as half-wins).

    Maximises Σ_ij w_ij·log(π_i/(π_i+π_j)) with `prior`/2 virtual wins each way for every pair.
    """
    k = wins.shape[0]
    w = wins + (prior / 2) * (1 - np.eye(k))
    games = w + w.T
    total_wins = w.sum(axis=1)
    pi = np.ones(k)
    for _ in range(max_iter):
        denom = (games / (pi[:, None] + pi[None, :])).sum(axis=1)
        new = total_wins / denom
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(new - pi) / pi) < tol:
            pi = new
            break
        pi = new
    log_pi = np.log(pi)
    return log_pi - log_pi.mean()


def effective_wins(wins: np.ndarray, ties: np.ndarray, both_bad: np.ndarray) -> np.ndarray:
    return wins + 0.5 * (ties + both_bad)


def bootstrap_strengths(names: Sequence[str], battles: Sequence[Battle], resamples: int = 300,
                        level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Point estimates and percentile intervals (k×2) from resampling battles with replacement."""
    k = len(names)
    point = fit_bradley_terry(effective_wins(*outcome_counts(names, battles)))
    if not battles:
        return point, np.column_stack([point, point])
    # Resample the multinomial over (ordered pair, outcome) cells: the same as resampling battles.
    index = {name: i for i, name in enumerate(names)}
    cells: dict[tuple[int, int, str], int] = {}
    for battle in battles:
        if battle.left in index and battle.right in index and battle.left != battle.right:
            key = (index[battle.left], index[battle.right], battle.winner)
            cells[key] = cells.get(key, 0) + 1
    keys = list(cells)
    counts = np.array([cells[key] for key in keys], dtype=float)
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(total, counts / total, size=resamples)
    fits = np.empty((resamples, k))
    for b in range(resamples):
        w = np.zeros((k, k))
        for (i, j, outcome), c in zip(keys, draws[b]):
            if outcome == "left":
                w[i, j] += c
            elif outcome == "right":
                w[j, i] += c
            else:
                w[i, j] += c / 2
                w[j, i] += c / 2
        fits[b] = fit_bradley_terry(w)
    tail = (1 - level) / 2 * 100
    return point, np.percentile(fits, [tail, 100 - tail], axis=0).T


def battle_summary(names: Sequence[str], battles: Sequence[Battle], resamples: int = 300) -> dict:
    """The `battles` block of the results document."""
    wins, ties, both_bad = outcome_counts(names, battles)
    point, ci = bootstrap_strengths(names, battles, resamples=resamples)
    games = wins + wins.T + ties + both_bad
    with np.errstate(invalid="ignore", divide="ignore"):
        win_rate = np.where(games > 0, (wins + 0.5 * (ties + both_bad)) / games, np.nan)
    return {
        "count": int(games.sum() / 2),
        "arms": list(names),
        "wins": wins.astype(int).tolist(),
        "ties": ties.astype(int).tolist(),
        "both_bad": both_bad.astype(int).tolist(),
        "win_rate": [[None if np.isnan(x) else round(float(x), 4) for x in row] for row in win_rate],
        "strengths": [{"name": name, "strength": float(point[i]), "ci": [float(ci[i, 0]), float(ci[i, 1])]}
                      for i, name in enumerate(names)],
    }
