"""The service façade over a real SQLite file and a real PostgreSQL server."""
import asyncio
import json
import random

import pytest
from experiments_helpers import postgres_bin, shared_postgres

from expo_serve.experiments import ExperimentError, ExperimentService, open_store
from expo_serve.experiments.config import parse_experiment

SWEEP = {"key": "alpha-sweep", "unit": "user", "allocation": "fixed", "primary_metric": "thumbs", "min_sample": 30,
         "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a03", "alpha": 0.3},
                  {"name": "a10", "alpha": 1.0}]}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'experiments.db'}"
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    return shared_postgres().new_database()


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def run(coro):
    return asyncio.run(coro)


async def _service(url, experiments=(), clock=None):
    service = ExperimentService(open_store(url), [parse_experiment(e) for e in experiments], clock=clock or Clock())
    await service.start(background=False)
    return service


def test_sticky_assignment_and_durable_exposures(db_url):
    async def body():
        service = await _service(db_url, [SWEEP])
        first = await service.assign("alpha-sweep", "alice", "r1")
        again = [await service.assign("alpha-sweep", "alice", f"r{i}") for i in range(2, 7)]
        assert {a.arm for a in again} == {first.arm} and first.first_exposure and not again[0].first_exposure
        assert first.alpha == {"control": 0.0, "a03": 0.3, "a10": 1.0}[first.arm]
        assert first.probability == pytest.approx(1 / 3)
        assert first.expo() == {"alpha": first.alpha, "experiment": "alpha-sweep", "arm": first.arm,
                                "exposure_id": first.exposure_id}
        await service.close()
        # A fresh process (new store, new connections) sees every acknowledged exposure.
        reader = await _service(db_url)
        for a in [first, *again]:
            row = await reader.exposure(a.exposure_id)
            assert row["arm"] == first.arm and row["unit_id"] == "alice" and row["probability"] == pytest.approx(1 / 3)
        results = await reader.results("alpha-sweep")
        arm = next(x for x in results["arms"] if x["name"] == first.arm)
        assert arm["units"] == 1 and arm["exposures"] == 6
        await reader.close()

    run(body())


def test_two_replicas_agree_on_every_unit(db_url):
    async def body():
        one, two = await _service(db_url, [SWEEP]), await _service(db_url)
        users = [f"u{i}" for i in range(60)]
        got = await asyncio.gather(*[svc.assign("alpha-sweep", u, f"{k}-{u}") for u in users
                                     for k, svc in enumerate((one, two, one))])
        by_user = {}
        for a in got:
            by_user.setdefault(a.unit_id, set()).add(a.arm)
        assert all(len(arms) == 1 for arms in by_user.values())
        assert sum(a.first_exposure for a in got) == len(users)
        await one.close()
        await two.close()

    run(body())


def test_feedback_replaces_and_validates(db_url):
    async def body():
        service = await _service(db_url, [SWEEP])
        a = await service.assign("alpha-sweep", "bob", "r1")
        first = await service.feedback(a.exposure_id, "thumbs", 1)
        second = await service.feedback(a.exposure_id, "thumbs", False, comment="changed my mind")
        assert not first["replaced"] and second["replaced"] and second["arm"] == a.arm
        await service.feedback(a.exposure_id, "rating", 4.5)
        row = await service.exposure(a.exposure_id)
        assert row["feedback"] == {"rating": {"value": 4.5, "comment": None},
                                   "thumbs": {"value": 0.0, "comment": "changed my mind"}}
        thumbs = next(x for x in (await service.results("alpha-sweep"))["arms"] if x["name"] == a.arm)["metrics"]["thumbs"]
        assert thumbs["n"] == 1 and thumbs["mean"] == 0.0
        cases = [(("exp_missing", "thumbs", 1), 404, "exposure_id"),
                 ((a.exposure_id, "thumbs", 0.5), 400, "value"),
                 ((a.exposure_id, "latency_s", 1.0), 400, "name"),
                 ((a.exposure_id, "rating", float("nan")), 400, "value"),
                 ((a.exposure_id, "bad name", 1), 400, "name")]
        for args, status, param in cases:
            with pytest.raises(ExperimentError) as info:
                await service.feedback(*args)
            assert (info.value.status, info.value.param) == (status, param)
        await service.close()

    run(body())


def test_a_refused_operation_does_not_sink_its_batch(db_url):
    async def body():
        service = await _service(db_url, [SWEEP])
        exposures = [await service.assign("alpha-sweep", f"u{i}", f"r{i}") for i in range(20)]
        calls = [service.feedback(a.exposure_id, "thumbs", i % 2) for i, a in enumerate(exposures)]
        calls += [service.feedback(f"exp_nope{i}", "thumbs", 1) for i in range(5)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(x, dict) for x in out[:20])
        assert all(isinstance(x, ExperimentError) and x.status == 404 for x in out[20:])
        results = await service.results("alpha-sweep")
        assert sum(arm["metrics"]["thumbs"]["n"] for arm in results["arms"]) == 20
        await service.close()

    run(body())


def test_phases_stop_restart_and_past_results(db_url):
    async def body():
        clock = Clock()
        service = await _service(db_url, [SWEEP], clock)
        for i in range(30):
            a = await service.assign("alpha-sweep", f"u{i}", f"r{i}")
            await service.feedback(a.exposure_id, "thumbs", 1)
        # Analysis settings only: same phase.
        view, created = await service.upsert_experiment({**SWEEP, "min_sample": 10, "description": "d"})
        assert not created and view["phase"] == 1 and view["min_sample"] == 10
        # Arms change while running: a new phase, with new arms.
        clock.now += 100
        edited = {**SWEEP, "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a05", "alpha": 0.5}]}
        view, _ = await service.upsert_experiment(edited)
        assert view["phase"] == 2 and [a["name"] for a in view["arms"]] == ["control", "a05"]
        assert (await service.assign("alpha-sweep", "u1", "x")).arm in {"control", "a05"}
        past = await service.results("alpha-sweep", phase=1)
        assert past["status"] == "ended" and [a["name"] for a in past["arms"]] == ["control", "a03", "a10"]
        assert sum(a["units"] for a in past["arms"]) == 30
        assert sum(a["units"] for a in (await service.results("alpha-sweep"))["arms"]) == 1
        stopped = await service.set_status("alpha-sweep", "stopped")
        assert stopped["status"] == "stopped" and stopped["phase"] == 2
        with pytest.raises(ExperimentError) as info:
            await service.assign("alpha-sweep", "u1", "y")
        assert info.value.code == "experiment_not_running" and info.value.param == "experiment"
        assert (await service.set_status("alpha-sweep", "running"))["phase"] == 3
        with pytest.raises(ExperimentError) as info:
            await service.results("alpha-sweep", phase=9)
        assert info.value.status == 404
        await service.close()

    run(body())


def test_default_experiment_and_units(db_url):
    async def body():
        per_request = {**SWEEP, "key": "per-request", "unit": "request", "default": True}
        service = await _service(db_url, [SWEEP, per_request])
        a = await service.assign(None, None, "req-1")
        assert a.experiment == "per-request" and a.unit_id == "req-1"
        with pytest.raises(ExperimentError) as info:
            await service.assign("alpha-sweep", None, "req-2")
        assert (info.value.status, info.value.param, info.value.code) == (400, "user", "missing_unit")
        with pytest.raises(ExperimentError) as info:
            await service.assign("nope", "u", "req-3")
        assert (info.value.status, info.value.code) == (404, "experiment_not_found")
        # Making the per-user experiment the default clears the other's flag; a user-less request then joins nothing.
        await service.upsert_experiment({**SWEEP, "default": True})
        assert [e["key"] for e in service.list_experiments() if e["default"]] == ["alpha-sweep"]
        assert await service.assign(None, None, "req-4") is None
        assert (await service.assign(None, "carol", "req-5")).experiment == "alpha-sweep"
        await service.close()

    run(body())


def test_file_experiments_apply_when_changed_only(db_url):
    async def body():
        service = await _service(db_url, [SWEEP])
        await service.set_status("alpha-sweep", "stopped")
        await service.close()
        again = await _service(db_url, [SWEEP])  # same file: the admin's stop stands
        assert again.get_experiment("alpha-sweep")["status"] == "stopped"
        await again.close()
        changed = await _service(db_url, [{**SWEEP, "min_sample": 5}])  # edited file: applied
        view = changed.get_experiment("alpha-sweep")
        assert view["status"] == "running" and view["min_sample"] == 5 and view["phase"] == 2
        await changed.close()

    run(body())


def test_outcomes_become_implicit_metrics(db_url):
    async def body():
        service = await _service(db_url, [SWEEP])
        for i in range(12):
            a = await service.assign("alpha-sweep", f"u{i}", f"r{i}")
            aborted = i == 0
            await service.record_outcome(a.exposure_id, latency_s=1.0 + i, ttft_s=0.1, output_tokens=10 * i,
                                         finish_reason="length" if i % 2 else "stop", aborted=aborted)
        with pytest.raises(ExperimentError) as info:
            await service.record_outcome("exp_missing", latency_s=1, ttft_s=None, output_tokens=1,
                                         finish_reason="stop", aborted=False)
        assert info.value.status == 404
        with pytest.raises(ExperimentError):
            await service.record_outcome(a.exposure_id, latency_s=-1, ttft_s=None, output_tokens=1,
                                         finish_reason="stop", aborted=False)
        results = await service.results("alpha-sweep")
        total = lambda m: sum(x["metrics"][m]["n"] for x in results["arms"])  # noqa: E731
        assert total("latency_s") == 11 and total("aborted") == 12 and total("ttft_s") == 12
        assert sum(x["metrics"]["aborted"]["mean"] * x["metrics"]["aborted"]["n"] for x in results["arms"]) == pytest.approx(1)
        assert sum(x["metrics"]["truncated"]["mean"] * x["metrics"]["truncated"]["n"] for x in results["arms"]) == pytest.approx(6)
        await service.close()

    run(body())


def test_thompson_weights_are_recomputed_on_schedule_and_logged(db_url):
    async def body():
        clock = Clock()
        spec = {**SWEEP, "key": "bandit", "allocation": "thompson",
                "thompson": {"burn_in": 10, "floor": 0.05, "update_every_s": 60}}
        service = await _service(db_url, [spec], clock)
        truth = {"control": 0.2, "a03": 0.8, "a10": 0.3}
        rng = random.Random(3)
        user = 0
        async def visit(uid):
            a = await service.assign("bandit", f"u{uid}", f"r{uid}")
            await service.feedback(a.exposure_id, "thumbs", int(rng.random() < truth[a.arm]))

        for _round in range(4):
            await asyncio.gather(*[visit(user + k) for k in range(60)])
            user += 60
            clock.now += 60
            await service.update_allocations()
        results = await service.results("bandit")
        history = results["weights_history"]
        # Phase start, the slot current at start-up (still burn-in), then one per elapsed slot.
        assert [h["reason"].split(":")[0] for h in history[:2]] == ["phase start", "burn-in"] and len(history) == 6
        assert [h["version"] for h in history[1:]] == [int(1_700_000_000 // 60) + k for k in range(5)]
        assert history[-1]["weights"]["a03"] > 0.7 and min(history[-1]["weights"].values()) >= 0.05 - 1e-9
        assert results["srm_p"] > 0.001  # expected counts follow the logged weights
        a03 = next(x for x in results["arms"] if x["name"] == "a03")
        assert a03["weight"] == pytest.approx(history[-1]["weights"]["a03"], abs=1e-6)
        assert a03["units"] > max(x["units"] for x in results["arms"] if x["name"] != "a03")
        await service.close()

    run(body())


def test_simulated_population_names_the_better_arm(db_url):
    """A small live run at the service level: thumbs depend on α; the results name a03."""
    async def body():
        clock = Clock()
        service = await _service(db_url, [SWEEP], clock)
        truth = {"control": 0.45, "a03": 0.68, "a10": 0.50}
        rng = random.Random(4)
        async def request(i):
            a = await service.assign("alpha-sweep", f"user-{i % 600}", f"r{i}")
            await service.record_outcome(a.exposure_id, latency_s=rng.gauss(1 + 0.2 * a.alpha, 0.1), ttft_s=0.05,
                                         output_tokens=int(rng.gauss(100 * (1 + 0.3 * a.alpha), 10)),
                                         finish_reason="stop", aborted=False)
            await service.feedback(a.exposure_id, "thumbs", int(rng.random() < truth[a.arm]))

        for start in range(0, 900, 50):  # 50 users in flight at a time, as on a busy server
            clock.now += 10
            await asyncio.gather(*[request(i) for i in range(start, start + 50)])
        results = await service.results("alpha-sweep", timeline=True)
        assert results["decision"]["winner"] == "a03", results["decision"]
        assert not results["srm_flagged"]
        arms = {a["name"]: a for a in results["arms"]}
        assert arms["a03"]["p_best"] > 0.95
        for name, p in truth.items():
            lo, hi = arms[name]["metrics"]["thumbs"]["ci"]
            assert lo <= p <= hi
        assert len(results["timeline"]["t"]) == 24 and results["timeline"]["p_best"]["a03"][-1] > 0.9
        json.dumps(results, allow_nan=False)  # a strict JSON document
        await service.close()

    run(body())


def _with_alpha(alpha: float) -> dict:
    return {**SWEEP, "arms": [*SWEEP["arms"][:2], {"name": "a10", "alpha": alpha}]}


def test_concurrent_edits_from_two_replicas_number_phases_without_gaps(db_url):
    async def body():
        one, two = await _service(db_url, [SWEEP]), await _service(db_url)
        # Each edit changes an arm's α, so each starts a phase; both replicas plan on a stale copy.
        edits = [(one, two)[i % 2].upsert_experiment(_with_alpha(2.0 + i / 10)) for i in range(12)]
        views = [view for view, created in await asyncio.gather(*edits)]
        assert sorted(view["phase"] for view in views) == list(range(2, 14))
        for phase in range(1, 14):
            results = await two.results("alpha-sweep", phase)
            assert results["status"] == ("running" if phase == 13 else "ended")
        # Each view is the experiment as its own edit left it.
        by_phase = {view["phase"]: view["arms"][2]["alpha"] for view in views}
        assert len(set(by_phase.values())) == 12
        await one.close()
        await two.close()

    run(body())


def test_a_stale_replica_logs_exposures_in_the_current_phase(db_url):
    async def body():
        one, two = await _service(db_url, [SWEEP]), await _service(db_url)
        await one.upsert_experiment(_with_alpha(2.0))  # phase 2; `two` has not re-read its copy
        a = await two.assign("alpha-sweep", "carol", "r1")
        assert a.phase == 2 and (a.arm != "a10" or a.alpha == 2.0)
        results = await two.results("alpha-sweep")
        assert results["phase"] == 2 and sum(arm["exposures"] for arm in results["arms"]) == 1
        # A stop from the stale replica keeps the other replica's edit instead of its old copy.
        await one.upsert_experiment(_with_alpha(3.0))
        stopped = await two.set_status("alpha-sweep", "stopped")
        assert stopped["status"] == "stopped" and stopped["arms"][2]["alpha"] == 3.0
        with pytest.raises(ExperimentError) as info:
            await one.assign("alpha-sweep", "dave", "r2")  # `one` still thinks it runs
        assert info.value.code == "experiment_not_running"
        await one.close()
        await two.close()

    run(body())
