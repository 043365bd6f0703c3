"""Thompson allocation: burn-in, floor, schedule, and that weight moves to the better arm."""
import numpy as np
import pytest

from expo_serve.experiments import bandit, stats
from expo_serve.experiments.assign import choose_arm
from expo_serve.experiments.config import parse_experiment


def _experiment(burn_in=20, floor=0.05):
    return parse_experiment({"key": "bandit", "allocation": "thompson",
                             "thompson": {"burn_in": burn_in, "floor": floor, "update_every_s": 60},
                             "arms": [{"name": "control", "alpha": 0, "control": True}, {"name": "a03", "alpha": 0.3},
                                      {"name": "a10", "alpha": 1.0, "weight": 2}]})


def _binary(successes, n):
    return stats.summarize(np.r_[np.ones(successes), np.zeros(n - successes)], np.ones(n), "binary")


def test_burn_in_keeps_the_configured_weights():
    exp = _experiment(burn_in=50)
    weights, reason = bandit.thompson_weights(exp, [_binary(20, 60), _binary(40, 60), _binary(5, 49)])
    assert weights == exp.fixed_weights() and reason.startswith("burn-in")


def test_weights_follow_p_best_with_a_floor():
    exp = _experiment(floor=0.05)
    weights, reason = bandit.thompson_weights(exp, [_binary(50, 200), _binary(120, 200), _binary(52, 200)])
    assert sum(weights.values()) == pytest.approx(1)
    assert weights["a03"] > 0.85 and min(weights.values()) >= 0.05 - 1e-12
    assert reason.startswith("thompson")


def test_floored_is_order_preserving_and_sums_to_one():
    out = bandit.floored([0.0, 0.2, 0.8], 0.1)
    assert out == pytest.approx([0.1, 0.24, 0.66]) and sum(out) == pytest.approx(1)


def test_schedule_slots_agree_across_replicas():
    assert bandit.schedule_slot(1000.0, 60) == bandit.schedule_slot(1019.9, 60) == 16
    assert bandit.schedule_slot(1020.0, 60) == 17


def test_simulated_bandit_moves_traffic_to_the_better_arm():
    """New users arrive in rounds; each round's weights come from the data so far."""
    rng = np.random.default_rng(8)
    exp = _experiment(burn_in=30)
    names = [a.name for a in exp.arms]
    truth = {"control": 0.40, "a03": 0.60, "a10": 0.45}
    data = {n: [] for n in names}
    weights = exp.fixed_weights()
    history = []
    for round_ in range(15):
        for u in range(100):
            arm = choose_arm(f"bandit:1:{round_}", f"user-{round_}-{u}", names, weights)
            data[arm].append(float(rng.random() < truth[arm]))
        summaries = [stats.summarize(np.array(data[n]), np.ones(len(data[n])), "binary") for n in names]
        weights, _ = bandit.thompson_weights(exp, summaries)
        history.append(weights)
    assert history[-1]["a03"] > 0.8
    assert min(history[-1].values()) >= exp.thompson.floor - 1e-12
    assert len(data["a03"]) > len(data["control"]) and len(data["a03"]) > len(data["a10"])
