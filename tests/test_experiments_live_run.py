"""The scripted live run's client side, against an OpenAI-compatible stand-in for the server's
chat route (assign → answer → record outcome, exactly the calls service.py documents)."""
import threading
import time
import uuid

import pytest
import uvicorn
from experiments_helpers import free_port, live_run
from experiments_standalone import create_app
from fastapi import Request

from expo_serve.experiments import ExperimentError, ExperimentService, open_store
from expo_serve.experiments.config import parse_experiment

EXPERIMENT = {"key": "alpha-sweep", "min_sample": 40, "primary_metric": "thumbs", "sequential_tuning_n": 150,
              "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a04", "alpha": 0.4},
                       {"name": "a15", "alpha": 1.5}]}


def chat_app(service):
    app = create_app(service, admin_key=None)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stand-in", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        request_id = "chatcmpl-" + uuid.uuid4().hex
        try:
            assignment = await service.assign(body.get("experiment"), body.get("user") or request.headers.get("x-expo-unit"),
                                              request_id)
        except ExperimentError as exc:
            from fastapi.responses import JSONResponse
            return JSONResponse(exc.envelope(), status_code=exc.status)
        alpha = assignment.alpha if assignment else 0.0
        text = f"An answer written at α={alpha}."
        await service.record_outcome(assignment.exposure_id, latency_s=0.05 * (1 + 0.1 * alpha), ttft_s=0.01,
                                     output_tokens=8, finish_reason="stop", aborted=False)
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": "stand-in",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13},
                "expo": {"alpha": alpha, **(assignment.expo() if assignment else {"experiment": None, "arm": None,
                                                                                   "exposure_id": None})}}

    return app


@pytest.fixture
def stand_in_server(tmp_path):
    service = ExperimentService(open_store(f"sqlite:///{tmp_path / 'live.db'}"), [parse_experiment(EXPERIMENT)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(chat_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_live_run_through_the_openai_client_names_the_preferred_arm(stand_in_server):
    summary = live_run(stand_in_server, "alpha-sweep", requests=600, users=500, concurrency=6, seed=3)
    assert summary["errors"] == [] and summary["requests"] == 600 and summary["votes"] > 420
    assert summary["preferred"] == "a04"
    assert summary["decision"]["winner"] == "a04", summary["decision"]
    assert summary["srm_p"] > 0.001
    arms = {a["name"]: a for a in summary["arms"]}
    for name, truth in summary["truth"].items():
        lo, hi = arms[name]["thumbs"]["ci"]
        assert lo - 0.03 <= truth <= hi + 0.03  # 95% intervals; a little slack keeps the fixed seed from being fragile
