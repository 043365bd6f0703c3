"""Statistics against independent references (scipy) and by simulation under continuous peeking."""
import math

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy import stats as sps

from expo_serve.experiments import stats
from expo_serve.experiments.config import parse_experiment
from expo_serve.experiments.results import primary_decision


def ones(n):
    return np.ones(n)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (45, 100), (1, 1000), (512, 1000)])
def test_wilson_matches_scipy(k, n):
    lo, hi = stats.wilson_interval(k, n)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_binary_summary_uses_wilson():
    values = np.array([1] * 30 + [0] * 70, dtype=float)
    s = stats.summarize(values, ones(100), "binary")
    ref = sps.binomtest(30, 100).proportion_ci(method="wilson")
    assert s.mean == 0.3 and s.n == 100 and s.units == 100 and s.n_eff == 100
    assert s.ci == (pytest.approx(ref.low), pytest.approx(ref.high))


def test_numeric_summary_matches_scipy_t_interval():
    rng = np.random.default_rng(1)
    values = rng.gamma(2.0, 1.5, size=57)
    s = stats.summarize(values, ones(57), "numeric")
    ref = sps.t.interval(0.95, 56, loc=values.mean(), scale=sps.sem(values))
    assert s.mean == pytest.approx(values.mean())
    assert s.ci[0] == pytest.approx(ref[0]) and s.ci[1] == pytest.approx(ref[1])


def test_clustered_variance_is_the_cluster_robust_sandwich():
    """Repeated observations per unit: Var equals the CR sandwich of an intercept-only regression
    with the G/(G−1) correction, computed here from the raw observations."""
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 6, size=40)
    unit_effect = rng.normal(0, 1, size=40)
    obs = [unit_effect[g] + rng.normal(0, 0.5, size=m) for g, m in enumerate(sizes)]
    y = np.concatenate(obs)
    mean = y.mean()
    scores = np.array([(o - mean).sum() for o in obs])
    sandwich = (scores ** 2).sum() / len(y) ** 2 * 40 / 39
    s = stats.summarize([o.sum() for o in obs], sizes, "numeric")
    assert s.mean == pytest.approx(mean) and s.var_mean == pytest.approx(sandwich)
    assert s.units == 40 and s.n == sizes.sum()


def test_clustered_intervals_keep_coverage_where_naive_ones_do_not():
    """Users who vote repeatedly and agree with themselves: treating votes as independent would
    cover the truth far less than 95% of the time; the unit-level interval does not."""
    rng = np.random.default_rng(3)
    truth, sims, hits, naive_hits = 0.6, 400, 0, 0
    for _ in range(sims):
        propensity = np.clip(rng.normal(truth, 0.3, size=60), 0, 1)
        counts = rng.integers(1, 9, size=60)
        sums = rng.binomial(counts, propensity).astype(float)
        s = stats.summarize(sums, counts, "binary")
        hits += s.ci[0] <= truth <= s.ci[1]
        lo, hi = stats.wilson_interval(sums.sum(), counts.sum())
        naive_hits += lo <= truth <= hi
    assert hits / sims >= 0.93
    assert naive_hits / sims < 0.85


def test_optimal_mixture_ratio_minimises_the_width():
    alpha = 0.05
    r = stats.optimal_mixture_ratio(alpha)
    width = lambda ratio: stats.sequential_half_width(1.0, ratio, alpha)  # noqa: E731
    best = optimize.minimize_scalar(width, bounds=(0.01, 100), method="bounded", options={"xatol": 1e-9})
    assert r == pytest.approx(best.x, rel=1e-4)
    assert r == pytest.approx(2 * math.log(1 / alpha) + math.log1p(r))


@pytest.mark.parametrize("var,tau2,alpha", [(0.01, 0.02, 0.05), (1e-4, 5e-4, 0.025), (2.0, 0.3, 0.1)])
def test_sequential_interval_inverts_the_mixture_likelihood_ratio(var, tau2, alpha):
    """The interval edge is where the mixture SPRT statistic equals 1/α (found numerically)."""
    def log_lambda(delta):
        return 0.5 * math.log(var / (var + tau2)) + tau2 * delta ** 2 / (2 * var * (var + tau2))

    edge = optimize.brentq(lambda d: log_lambda(d) - math.log(1 / alpha), 0, 100 * math.sqrt(var + tau2))
    assert stats.sequential_half_width(var, tau2, alpha) == pytest.approx(edge, rel=1e-9)
    assert stats.msprt_p_value(edge, var, tau2) == pytest.approx(alpha, rel=1e-9)
    # Always wider than the fixed-horizon z interval: the price of peeking.
    assert edge > sps.norm.ppf(1 - alpha / 2) * math.sqrt(var)


def test_compare_reports_absolute_and_relative_lift():
    c = stats.summarize(np.r_[np.ones(400), np.zeros(600)], ones(1000), "binary")
    t = stats.summarize(np.r_[np.ones(480), np.zeros(520)], ones(1000), "binary")
    lift = stats.compare(c, t, alpha=0.05, tuning_n=1000)
    assert lift.diff == pytest.approx(0.08) and lift.relative == pytest.approx(0.2)
    assert lift.diff_ci[0] > 0 and lift.relative_ci[0] > 0 and lift.p_value < 0.05
    # No data, or all-zero binary arms, never give a certain answer.
    empty = stats.summarize([], [], "binary")
    assert stats.compare(c, empty, 0.05, 1000) is None
    zeros = stats.summarize(np.zeros(20), ones(20), "binary")
    tie = stats.compare(zeros, zeros, 0.05, 1000)
    assert tie.diff_ci[0] < 0 < tie.diff_ci[1]


def test_p_best_matches_exact_integration_for_two_beta_arms():
    a = stats.summarize(np.r_[np.ones(40), np.zeros(60)], ones(100), "binary")
    b = stats.summarize(np.r_[np.ones(50), np.zeros(50)], ones(100), "binary")
    # P(B > A) = ∫ f_B(x) F_A(x) dx with A ~ Beta(41, 61), B ~ Beta(51, 51).
    exact, _ = integrate.quad(lambda x: sps.beta.pdf(x, 51, 51) * sps.beta.cdf(x, 41, 61), 0, 1)
    p = stats.probability_best([a, b])
    assert p[1] == pytest.approx(exact, abs=0.01) and sum(p) == pytest.approx(1)
    assert stats.probability_best([a, b]) == p  # fixed seed: same data, same answer
    assert stats.probability_best([a, b], higher_is_better=False)[0] == pytest.approx(exact, abs=0.01)


def test_p_best_matches_exact_integration_for_three_numeric_arms():
    rng = np.random.default_rng(4)
    arms = [stats.summarize(rng.normal(mu, 1, size=30), ones(30), "numeric") for mu in (0.0, 0.2, 0.3)]
    dists = [sps.t(a.units - 1, loc=a.mean, scale=math.sqrt(a.var_mean)) for a in arms]
    exact = [integrate.quad(lambda x, i=i: dists[i].pdf(x) * np.prod([d.cdf(x) for j, d in enumerate(dists) if j != i]),
                            -np.inf, np.inf)[0] for i in range(3)]
    p = stats.probability_best(arms)
    assert p == pytest.approx(exact, abs=0.01)
    one_unit = stats.summarize([1.0], [1], "numeric")
    assert stats.probability_best([arms[0], one_unit]) is None


def test_srm_matches_scipy_chisquare():
    observed = [480, 530, 990]
    expected = [500, 500, 1000]
    assert stats.srm_p_value(observed, expected) == pytest.approx(sps.chisquare(observed, expected).pvalue)
    assert stats.srm_p_value([0, 0], [0.5, 0.5]) is None
    assert stats.srm_p_value([5, 3], [8, 0]) == 0.0  # units in an arm that should have none
    assert stats.srm_p_value([1000, 800], [0.5, 0.5]) < stats.SRM_THRESHOLD


@pytest.mark.parametrize("relative,ci,inc,dec,expected", [
    (0.4, (0.3, 0.5), 0.25, None, "violated"),
    (0.3, (0.1, 0.5), 0.25, None, "at_risk"),
    (0.1, (-0.1, 0.3), 0.25, None, "ok"),
    (-0.5, (-0.6, -0.4), None, 0.2, "violated"),
])
def test_guardrail_status(relative, ci, inc, dec, expected):
    lift = stats.Lift(relative, ci, relative, ci, 0.5)
    assert stats.guardrail_status(lift, inc, dec) == expected
    assert stats.guardrail_status(None, inc, dec) == "no_data"


def test_decision_needs_healthy_split_minimum_sample_and_separation():
    lift_win = stats.Lift(0.1, (0.02, 0.18), 0.2, (0.04, 0.36), 0.001)
    args = dict(names=["c", "t"], control="c", primary_units=[200, 200], p_best=[0.01, 0.99],
                lifts={"t": lift_win}, higher_is_better=True, srm_p=0.5, min_sample=100, p_best_threshold=0.95,
                guardrail_violations={})
    assert stats.decide(**args).winner == "t"
    assert stats.decide(**{**args, "srm_p": 1e-5}).status == "srm"
    assert stats.decide(**{**args, "primary_units": [200, 99]}).status == "collecting"
    assert stats.decide(**{**args, "p_best": [0.1, 0.9]}).status == "no_winner_yet"
    unsure = stats.Lift(0.1, (-0.01, 0.2), 0.2, (-0.02, 0.4), 0.2)
    assert stats.decide(**{**args, "lifts": {"t": unsure}}).status == "no_winner_yet"
    guarded = stats.decide(**{**args, "guardrail_violations": {"t": ["output_tokens"]}})
    assert guarded.status == "guardrail" and guarded.winner is None and guarded.leader == "t"
    control_wins = stats.decide(**{**args, "p_best": [0.99, 0.01],
                                   "lifts": {"t": stats.Lift(-0.1, (-0.2, -0.01), -0.2, (-0.3, -0.02), 0.01)}})
    assert control_wins.winner == "c"


# --- simulations: continuous monitoring ----------------------------------------------------------

def _experiment(arms, min_sample=100):
    return parse_experiment({"key": "sim", "min_sample": min_sample,
                             "arms": [{"name": n, "alpha": i * 0.3, "control": i == 0} for i, n in enumerate(arms)]})


def _peeking_run(rng, experiment, rates, looks, per_look, draws=2000):
    """Bernoulli traffic; the decision is read after every batch. Returns the first winner or None."""
    names = [a.name for a in experiment.arms]
    data = {n: np.empty(0) for n in names}
    for _ in range(looks):
        for n, p in zip(names, rates):
            data[n] = np.r_[data[n], rng.random(per_look) < p]
        primary = {n: stats.summarize(data[n].astype(float), np.ones(len(data[n])), "binary") for n in names}
        decision, _, _ = primary_decision(experiment, primary, srm_p=None, violations={}, draws=draws)
        if decision.winner is not None:
            return decision.winner
    return None


def _naive_peeking_run(rng, rates, looks, per_look, alpha=0.05):
    """The mistake the always-valid interval prevents: a fixed-horizon z-test read at every look."""
    a, b = np.empty(0), np.empty(0)
    for _ in range(looks):
        a, b = np.r_[a, rng.random(per_look) < rates[0]], np.r_[b, rng.random(per_look) < rates[1]]
        pooled = (a.sum() + b.sum()) / (len(a) + len(b))
        se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b))) or 1.0
        if abs(b.mean() - a.mean()) / se > sps.norm.ppf(1 - alpha / 2):
            return True
    return False


def test_equal_arms_false_winner_rate_stays_within_nominal_level_under_peeking():
    rng = np.random.default_rng(11)
    exp = _experiment(["control", "a03", "a10"])
    sims, looks, per_look = 150, 10, 100
    false_winners = sum(_peeking_run(rng, exp, [0.5, 0.5, 0.5], looks, per_look) is not None for _ in range(sims))
    naive = sum(_naive_peeking_run(rng, [0.5, 0.5], looks, per_look) for _ in range(sims))
    assert false_winners / sims <= exp.significance
    # The simulation can see a broken method: naive peeking exceeds the level clearly.
    assert naive / sims > 0.1


def test_a_real_difference_is_found_and_the_right_arm_named():
    rng = np.random.default_rng(12)
    exp = _experiment(["control", "better"])
    sims = 60
    winners = [_peeking_run(rng, exp, [0.45, 0.60], looks=12, per_look=100) for _ in range(sims)]
    assert winners.count("better") / sims >= 0.8
    assert "control" not in winners


@pytest.mark.slow
def test_false_winner_rate_sweep():
    """Heavier: 2,000 A/A runs over 3 arms and 20 looks, binary metric near 0.1 and 0.5."""
    for rate in (0.1, 0.5):
        rng = np.random.default_rng(int(rate * 100))
        exp = _experiment(["control", "a", "b"])
        sims = 1000
        rate_hat = sum(_peeking_run(rng, exp, [rate] * 3, 20, 100) is not None for _ in range(sims)) / sims
        assert rate_hat <= exp.significance
