"""Experiments in the real server: a scripted live run of simulated users, through the official
openai client against `expo-serve serve --experiments FILE`, ends with the results route and the
dashboard naming the arm the population truly prefers. Battles generate at two arms in one batch."""
import httpx
import pytest
import yaml
from experiments_helpers import live_run
from server_process import ServerProcess, serve_command

EXPERIMENTS = [{"key": "alpha-sweep", "unit": "user", "allocation": "fixed", "primary_metric": "thumbs", "default": True,
                "min_sample": 40, "sequential_tuning_n": 150,
                "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a04", "alpha": 0.4},
                         {"name": "a15", "alpha": 1.5}]}]
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def server(pairs, tmp_path_factory):
    sft, aligned = pairs("qwen2")
    root = tmp_path_factory.mktemp("experiments-server")
    (root / "experiments.yaml").write_text(yaml.safe_dump(EXPERIMENTS))
    process = ServerProcess(serve_command(sft, aligned, "--experiments", str(root / "experiments.yaml"),
                                          "--db", f"sqlite:///{root / 'experiments.db'}", "--admin-key", ADMIN),
                            root / "server.log")
    yield process
    process.stop()


def test_live_run_names_the_preferred_arm_on_results_and_dashboard(server):
    summary = live_run(server.url, "alpha-sweep", requests=600, users=500, concurrency=8, seed=3, max_tokens=6)
    assert summary["errors"] == [] and summary["requests"] == 600
    assert summary["preferred"] == "a04"
    assert summary["decision"]["winner"] == "a04", summary["decision"]
    assert summary["srm_p"] > 0.001
    arms = {a["name"]: a for a in summary["arms"]}
    assert sum(a["exposures"] for a in arms.values()) == 600
    for name, truth in summary["truth"].items():
        lo, hi = arms[name]["thumbs"]["ci"]
        assert lo - 0.03 <= truth <= hi + 0.03
    page = httpx.get(server.url + "/dashboard", params={"experiment": "alpha-sweep"}, timeout=30).text
    assert "Winner" in page and "a04" in page
    # Implicit signals were recorded by the server itself for every exposure.
    results = httpx.get(server.url + "/v1/experiments/alpha-sweep/results", timeout=30).json()
    control = next(a for a in results["arms"] if a["name"] == "control")
    assert control["metrics"]["output_tokens"]["n"] == control["exposures"]


def test_request_with_its_own_alpha_is_not_counted_and_battles_run(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="unused")
    before = httpx.get(server.url + "/v1/experiments/alpha-sweep/results", timeout=30).json()
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          user="someone", extra_body={"alpha": 2.0})
    assert chat.model_extra["expo"] == {"alpha": 2.0, "experiment": None, "arm": None, "exposure_id": None}
    after = httpx.get(server.url + "/v1/experiments/alpha-sweep/results", timeout=30).json()
    assert sum(a["exposures"] for a in after["arms"]) == sum(a["exposures"] for a in before["arms"])

    battle = httpx.post(server.url + "/v1/experiments/alpha-sweep/battles", timeout=60,
                        json={"messages": [{"role": "user", "content": "Paris is the capital of"}], "max_tokens": 5})
    assert battle.status_code == 200, battle.text
    body = battle.json()
    assert set(body["left"]) == {"content"} and set(body["right"]) == {"content"}  # the α stays hidden
    vote = httpx.post(server.url + f"/v1/battles/{body['id']}/vote", json={"winner": "left"}, timeout=30)
    assert vote.status_code == 200, vote.text
    unauthorized = httpx.post(server.url + "/v1/experiments/alpha-sweep/stop", timeout=30)
    assert unauthorized.status_code in (401, 403) and "error" in unauthorized.json()
