"""The routes over real HTTP (uvicorn subprocess on 127.0.0.1), errors in OpenAI's envelope, and
no acknowledged record lost when the server is killed with SIGKILL under load."""
import asyncio
import json
import threading
import time

import httpx
import pytest
from experiments_helpers import StandaloneServer, postgres_bin, shared_postgres
from experiments_standalone import create_app, placeholder_pair

from expo_serve.experiments import ExperimentService, open_store

SWEEP = {"key": "alpha-sweep", "unit": "user", "allocation": "fixed", "primary_metric": "thumbs",
         "arms": [{"name": "control", "alpha": 0.0, "weight": 1, "control": True},
                  {"name": "a03", "alpha": 0.3, "weight": 1}]}
ADMIN = {"X-Admin-Key": "admin-secret"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'experiments.db'}"
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    return shared_postgres().new_database()


def assert_envelope(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


@pytest.fixture
def server(tmp_path):
    with StandaloneServer(f"sqlite:///{tmp_path / 'http.db'}") as srv:
        yield srv


def test_experiment_lifecycle_feedback_and_battles_over_http(server):
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        assert_envelope(http.post("/v1/experiments", json=SWEEP), 401, "invalid_admin_key")
        created = http.post("/v1/experiments", json=SWEEP, headers=ADMIN)
        assert created.status_code == 201 and created.json()["phase"] == 1
        assert http.post("/v1/experiments", json={**SWEEP, "description": "d"}, headers=ADMIN).status_code == 200
        assert [e["key"] for e in http.get("/v1/experiments").json()["data"]] == ["alpha-sweep"]

        exposure = http.post("/v1/assign", json={"experiment": "alpha-sweep"}, headers={"X-ExPO-Unit": "dana"}).json()
        expo = exposure["expo"]
        assert expo["experiment"] == "alpha-sweep" and expo["exposure_id"].startswith("exp_")
        assert exposure["probability"] == 0.5 and exposure["unit_id"] == "dana"
        assert http.post("/v1/outcomes", json={"exposure_id": expo["exposure_id"], "latency_s": 1.2, "ttft_s": 0.1,
                                               "output_tokens": 50, "finish_reason": "stop"}).status_code == 200
        fb = http.post("/v1/feedback", json={"exposure_id": expo["exposure_id"], "name": "thumbs", "value": 1,
                                             "comment": "good"})
        assert fb.status_code == 200 and fb.json()["arm"] == expo["arm"]
        stored = http.get(f"/v1/exposures/{expo['exposure_id']}", headers=ADMIN).json()
        assert stored["feedback"]["thumbs"] == {"value": 1.0, "comment": "good"} and stored["outcome"]["output_tokens"] == 50

        battle = http.post("/v1/experiments/alpha-sweep/battles",
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
        assert battle.status_code == 200
        body = battle.json()
        assert set(body) == {"id", "object", "experiment", "left", "right"} and set(body["left"]) == {"content"}
        # Blind: neither side names its arm or α (the random battle id may contain any letters).
        sides = json.dumps([body["left"], body["right"], body["experiment"]])
        assert "\"alpha\"" not in sides and "a03" not in sides and "control" not in sides
        vote = http.post(f"/v1/battles/{body['id']}/vote", json={"winner": "left"}).json()
        assert {vote["left"]["arm"], vote["right"]["arm"]} == {"control", "a03"}

        results = http.get("/v1/experiments/alpha-sweep/results").json()
        assert {"key", "phase", "srm_p", "arms"} <= set(results) and results["battles"]["count"] == 1
        arm = next(a for a in results["arms"] if a["name"] == expo["arm"])
        assert {"name", "alpha", "units", "exposures", "p_best", "metrics"} <= set(arm)
        assert arm["metrics"]["thumbs"] == {**arm["metrics"]["thumbs"], "n": 1, "mean": 1.0}

        stopped = http.post("/v1/experiments/alpha-sweep/stop", headers=ADMIN).json()
        assert stopped["status"] == "stopped"
        assert_envelope(http.post("/v1/assign", json={"experiment": "alpha-sweep", "user": "x"}), 400,
                        "experiment_not_running", "experiment")


@pytest.fixture
def app_client(tmp_path):
    """The same routes in-process (httpx's ASGI transport) for the many error cases."""
    async def make():
        service = ExperimentService(open_store(f"sqlite:///{tmp_path / 'asgi.db'}"))
        await service.start(background=False)
        await service.upsert_experiment(SWEEP)
        app = create_app(service, "admin-secret", placeholder_pair)
        return service, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return make


@pytest.mark.parametrize("method,path,payload,headers,status,code,param", [
    ("post", "/v1/experiments", {**SWEEP, "unit": "nope"}, ADMIN, 400, "invalid_value", "unit"),
    ("post", "/v1/experiments", {**SWEEP, "arms": []}, ADMIN, 400, "invalid_value", "arms"),
    ("post", "/v1/experiments", SWEEP, {"X-Admin-Key": "wrong"}, 401, "invalid_admin_key", None),
    ("post", "/v1/experiments", SWEEP, {"Authorization": "Bearer wrong"}, 401, "invalid_admin_key", None),
    ("get", "/v1/experiments/nope", None, {}, 404, "experiment_not_found", "experiment"),
    ("post", "/v1/experiments/nope/stop", None, ADMIN, 404, "experiment_not_found", None),
    ("get", "/v1/experiments/alpha-sweep/results?phase=abc", None, {}, 400, "invalid_value", "phase"),
    ("get", "/v1/experiments/alpha-sweep/results?phase=7", None, {}, 404, "phase_not_found", "phase"),
    ("post", "/v1/feedback", {"exposure_id": "exp_x", "name": "thumbs"}, {}, 400, "missing_field", "value"),
    ("post", "/v1/feedback", {"exposure_id": "exp_x", "name": "thumbs", "value": 1, "extra": 1}, {}, 400, "unknown_field", "extra"),
    ("post", "/v1/feedback", {"exposure_id": "exp_x", "name": "thumbs", "value": "1"}, {}, 400, "invalid_value", "value"),
    ("post", "/v1/feedback", {"exposure_id": "exp_x", "name": "thumbs", "value": 1}, {}, 404, "exposure_not_found", "exposure_id"),
    ("post", "/v1/feedback", [1, 2], {}, 400, "invalid_json", None),
    ("post", "/v1/experiments/alpha-sweep/battles", {"messages": []}, {}, 400, "invalid_value", "messages"),
    ("post", "/v1/experiments/alpha-sweep/battles", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, {}, 400, "invalid_value", "max_tokens"),
    ("post", "/v1/experiments/nope/battles", {"messages": [{"role": "user", "content": "x"}]}, {}, 404, "experiment_not_found", "experiment"),
    ("post", "/v1/battles/bat_nope/vote", {"winner": "left"}, {}, 404, "battle_not_found", None),
    ("post", "/v1/battles/bat_nope/vote", {"winner": "middle"}, {}, 400, "invalid_value", "winner"),
    ("get", "/v1/exposures/exp_nope", None, {}, 401, "invalid_admin_key", None),
    ("get", "/dashboard?key=nope", None, {}, 404, "experiment_not_found", "key"),
])
def test_every_error_is_an_openai_envelope(app_client, method, path, payload, headers, status, code, param):
    async def body():
        service, client = await app_client()
        async with client:
            response = await client.request(method.upper(), path, json=payload, headers=headers)
        await service.close()
        return response

    assert_envelope(asyncio.run(body()), status, code, param)


def test_invalid_json_and_disabled_admin(tmp_path):
    async def body():
        service = ExperimentService(open_store(f"sqlite:///{tmp_path / 'x.db'}"))
        await service.start(background=False)
        app = create_app(service, None)  # no admin key: admin routes off; no generator: no battles
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            bad_json = await client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
            disabled = await client.post("/v1/experiments", json=SWEEP)
            await service.upsert_experiment(SWEEP)
            no_model = await client.post("/v1/experiments/alpha-sweep/battles",
                                         json={"messages": [{"role": "user", "content": "x"}]})
        await service.close()
        return bad_json, disabled, no_model

    bad_json, disabled, no_model = asyncio.run(body())
    assert_envelope(bad_json, 400, "invalid_json")
    assert_envelope(disabled, 403, "admin_disabled")
    assert_envelope(no_model, 501, "battles_unavailable")


# --- durability -----------------------------------------------------------------------------------

def _load(base_url, acked_exposures, acked_feedback, stop, errors):
    """One client thread: assign, then vote, as fast as the server answers; remember what was acknowledged."""
    with httpx.Client(base_url=base_url, timeout=5) as http:
        i = 0
        while not stop.is_set():
            i += 1
            user = f"{threading.get_ident()}-{i % 50}"
            try:
                r = http.post("/v1/assign", json={"experiment": "alpha-sweep", "user": user})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                exposure_id = r.json()["expo"]["exposure_id"]
                acked_exposures.append(exposure_id)
                value = i % 2
                f = http.post("/v1/feedback", json={"exposure_id": exposure_id, "name": "thumbs", "value": value})
                if f.status_code == 200:
                    acked_feedback.append((exposure_id, value))
            except httpx.HTTPError:
                return  # the server died mid-request: that request was never acknowledged


def test_sigkill_under_load_loses_nothing_acknowledged(db_url, tmp_path):
    experiments = tmp_path / "experiments.json"
    experiments.write_text(json.dumps([SWEEP]))
    server = StandaloneServer(db_url, str(experiments)).start()
    acked_exposures, acked_feedback, errors = [], [], []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(server.base_url, acked_exposures, acked_feedback, stop, errors))
               for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked_feedback) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while requests are in flight
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors and len(acked_feedback) >= 200
    restarted = StandaloneServer(db_url, str(experiments)).start()
    try:
        with httpx.Client(base_url=restarted.base_url, timeout=10, headers=ADMIN) as http:
            for exposure_id in acked_exposures:
                assert http.get(f"/v1/exposures/{exposure_id}").status_code == 200, exposure_id
            for exposure_id, value in acked_feedback:
                assert http.get(f"/v1/exposures/{exposure_id}").json()["feedback"]["thumbs"]["value"] == value
            results = http.get("/v1/experiments/alpha-sweep/results").json()
        assert sum(a["exposures"] for a in results["arms"]) >= len(acked_exposures)
        assert sum(a["metrics"]["thumbs"]["n"] for a in results["arms"]) >= len(acked_feedback)
    finally:
        restarted.stop()


def test_a_nul_character_is_a_400_on_every_store(db_url):
    """PostgreSQL text cannot hold NUL: ids, units and comments with one are refused as bad input
    (400 with the envelope), reads and writes alike, and the store serves on."""
    with StandaloneServer(db_url) as srv, httpx.Client(base_url=srv.base_url, timeout=10) as http:
        assert http.post("/v1/experiments", json=SWEEP, headers=ADMIN).status_code == 201
        assert_envelope(http.get("/v1/experiments/alpha%00sweep"), 404, "experiment_not_found")  # held in memory
        assert_envelope(http.get("/v1/exposures/exp_%00", headers=ADMIN), 400, "invalid_value")
        assert_envelope(http.post("/v1/feedback", json={"exposure_id": "exp_\x00", "name": "thumbs", "value": 1}),
                        400, "invalid_value")
        assert_envelope(http.post("/v1/battles/bat_%00/vote", json={"winner": "left"}), 400, "invalid_value")
        assert http.get("/v1/experiments/alpha-sweep").status_code == 200
