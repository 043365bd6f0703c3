"""The app in-process, where a test can reach inside: a failure mid-stream, and the experiments seam.

The engine is real; the experiments object is a stand-in that follows alpha.Experiments, the
contract expo_serve.experiments.ExperimentService is wired through.
"""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from expo_serve.engine.request import SamplingParams
from expo_serve.server.app import create_app
from expo_serve.server.experiments_wiring import pair_generator
from expo_serve.server.settings import ServerSettings
from server_process import sse_events

MESSAGES = [{"role": "user", "content": "Paris is the capital of"}]


@dataclass
class Assigned:
    experiment: str
    arm: str
    alpha: float
    exposure_id: str


class StubExperiments:
    """Units named "bold-…" land in arm "bold" (α 2.5), "wild-…" in a misconfigured arm (α 99),
    others in "control" (α 0); without a unit or a named experiment, nothing applies."""

    def __init__(self):
        self.assigned: list[tuple] = []
        self.outcomes: dict[str, dict] = {}
        self.running = False

    async def start(self):
        self.running = True

    async def close(self):
        self.running = False

    async def assign(self, experiment_key, unit_id, request_id):
        self.assigned.append((experiment_key, unit_id, request_id))
        if experiment_key is None and unit_id is None:
            return None
        arm, alpha = {"bold": ("bold", 2.5), "wild": ("wild", 99.0)}.get((unit_id or "").split("-")[0], ("control", 0.0))
        return Assigned(experiment_key or "default", arm, alpha, f"exp_{len(self.assigned)}")

    async def record_outcome(self, exposure_id, **outcome):
        self.outcomes[exposure_id] = outcome


def _app(engine, experiments=None, **settings):
    settings = ServerSettings(sft="unused", aligned="unused", model_name="tiny", **settings)
    return create_app(settings, engine, experiments=experiments)


def _client(app) -> httpx.AsyncClient:
    # As a server does, answer an unexpected exception with the app's 500 instead of raising it here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)


def test_a_failure_mid_stream_sends_an_error_event_then_done(engine, monkeypatch):
    app = _app(engine)
    step = engine.engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return step()

    monkeypatch.setattr(engine.engine, "step", failing_step)

    async def scenario():
        async with _client(app) as client:
            streamed = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20,
                                                                       "ignore_eos": True, "stream": True})
            calls["n"] = 3  # the whole (non-streamed) answer fails at its next step
            whole = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20,
                                                                    "ignore_eos": True})
            monkeypatch.undo()
            after = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
            return streamed, whole, after

    streamed, whole, after = asyncio.run(scenario())
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    chunks = [json.loads(e) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and len(chunks) >= 2
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "injected" not in error["message"]  # internals stay in the log
    assert events[-1] == "[DONE]"
    assert not any(c["choices"][0].get("finish_reason") for c in chunks)
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "internal_error"
    assert after.status_code == 200  # the engine serves on


def test_an_experiment_chooses_alpha_and_hears_the_outcome(engine):
    experiments = StubExperiments()
    app = _app(engine, experiments)
    body = {"messages": MESSAGES, "max_tokens": 8, "ignore_eos": True, "temperature": 0}


    async def scenario():
        async with _client(app) as client:
            post = client.post
            bold = await post("/v1/chat/completions", json=body | {"user": "bold-1"})
            direct = await post("/v1/chat/completions", json=body | {"alpha": 2.5})
            streamed = await post("/v1/chat/completions", json=body | {"experiment": "exp-a", "stream": True},
                                  headers={"X-ExPO-Unit": "unit-9"})
            plain = await post("/v1/chat/completions", json=body)
            wild = await post("/v1/chat/completions", json=body | {"user": "wild-1"})
            await app.state.serving.reports.flush()
            return bold, direct, streamed, plain, wild

    bold, direct, streamed, plain, wild = asyncio.run(scenario())
    assert bold.status_code == 200 and bold.headers["x-expo-alpha"] == "2.5"
    expo = bold.json()["expo"]
    assert expo == {"alpha": 2.5, "experiment": "default", "arm": "bold", "exposure_id": expo["exposure_id"]}
    assert bold.json()["choices"][0]["alpha"] == 2.5
    # The assigned α serves exactly as the same α asked for directly; an own α joins nothing.
    assert direct.json()["choices"][0]["message"]["content"] == bold.json()["choices"][0]["message"]["content"]
    assert direct.json()["expo"]["arm"] is None
    assert [a[:2] for a in experiments.assigned] == [(None, "bold-1"), ("exp-a", "unit-9"), (None, None),
                                                     (None, "wild-1")]
    # The X-ExPO-Unit header is the unit when `user` is absent; streaming carries expo in chunk one.
    first = json.loads(sse_events(streamed.text)[0])
    assert first["expo"]["arm"] == "control" and first["expo"]["experiment"] == "exp-a"
    assert plain.json()["expo"] == {"alpha": 0.0, "experiment": None, "arm": None, "exposure_id": None}
    # An arm whose α the server cannot serve is the operator's error, not the client's.
    assert wild.status_code == 500 and wild.json()["error"]["code"] == "experiment_misconfigured"

    outcome = experiments.outcomes[expo["exposure_id"]]
    assert outcome["output_tokens"] == bold.json()["usage"]["completion_tokens"] == 8
    assert outcome["finish_reason"] == "length" and outcome["aborted"] is False
    assert 0 < outcome["ttft_s"] <= outcome["latency_s"]
    assert first["expo"]["exposure_id"] in experiments.outcomes

    metrics = app.state.serving.metrics.render().decode()
    assert 'expo:generation_tokens_total{arm="bold",model_name="tiny"} 8.0' in metrics
    assert 'arm="control"' in metrics


def test_the_api_key_guards_v1_and_large_bodies_get_413(engine):
    app = _app(engine, api_key="s3cret", max_body_bytes=4096)
    body = {"messages": MESSAGES, "max_tokens": 2}

    async def chunked(data: bytes):  # no Content-Length: the limit must count what arrives
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    async def scenario():
        async with _client(app) as client:
            key = {"Authorization": "Bearer s3cret"}
            return {
                "none": await client.post("/v1/chat/completions", json=body),
                "wrong": await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}),
                "basic": await client.get("/v1/models", headers={"Authorization": "Basic czNjcmV0"}),
                "right": await client.post("/v1/chat/completions", json=body, headers=key),
                "health": await client.get("/health"),
                "metrics": await client.get("/metrics"),
                "big": await client.post("/v1/chat/completions", headers=key | {"content-type": "application/json"},
                                         content=json.dumps(body | {"pad": "x" * 5000})),
                "big_chunked": await client.post("/v1/chat/completions", headers=key,
                                                 content=chunked(json.dumps(body | {"pad": "x" * 5000}).encode())),
                "big_unauthorized": await client.post("/v1/chat/completions", content=b"x" * 10000),
            }

    r = asyncio.run(scenario())
    for name in ("none", "wrong", "basic", "big_unauthorized"):  # the key is checked before the body is read
        assert r[name].status_code == 401, name
        assert r[name].json()["error"]["code"] == "invalid_api_key"
    assert r["none"].headers["www-authenticate"] == "Bearer"
    assert r["right"].status_code == 200
    assert r["health"].status_code == 200 and r["metrics"].status_code == 200  # open: probes carry no key
    for name in ("big", "big_chunked"):
        assert r[name].status_code == 413, name
        assert r[name].json()["error"]["code"] == "request_too_large"


def test_experiments_plug_in_at_create_app(engine):
    """How experiments are wired: their service (started and closed with the app), their routes
    and error handler added to the app (the API key covers their /v1 routes too), and the battle
    generator, which answers as chat requests at those α do."""
    experiments = StubExperiments()
    router = APIRouter()

    class Refused(Exception):
        pass

    @router.get("/v1/experiments")
    async def list_experiments():
        return {"data": []}

    @router.post("/v1/experiments/refuse")
    async def refuse():
        raise Refused()

    async def refused(_request, _exc):
        return JSONResponse({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                       "code": "refused"}}, status_code=409)

    settings = ServerSettings(sft="unused", aligned="unused", model_name="tiny", api_key="k")
    app = create_app(settings, engine, experiments=experiments)
    app.include_router(router)
    app.add_exception_handler(Refused, refused)
    key = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        assert experiments.running
        assert client.get("/v1/experiments").status_code == 401
        assert client.get("/v1/experiments", headers=key).json() == {"data": []}
        assert client.post("/v1/experiments/refuse", headers=key).status_code == 409
        generate_pair = functools.partial(pair_generator(app.state.serving), MESSAGES, [0.0, 2.5], max_tokens=6,
                                          temperature=0.0)
        texts = client.portal.call(generate_pair)
        for alpha, text in zip((0.0, 2.5), texts):
            reply = client.post("/v1/chat/completions", headers=key,
                                json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "alpha": alpha})
            assert reply.json()["choices"][0]["message"]["content"] == text
        assert texts[0] != texts[1]
    assert not experiments.running


def test_a_request_cancelled_before_the_engine_takes_it_leaves_the_engine_serving(engine, monkeypatch):
    """What a client gone while its request waits in the command queue causes (schemathesis found
    it: the engine thread died on the cancelled acceptance, and the server hung)."""
    step = engine.engine.step
    in_step, go_on = threading.Event(), threading.Event()

    def gated_step():  # holds the engine inside a step while the test queues and cancels
        in_step.set()
        go_on.wait(120)  # a bound on a failure only
        return step()

    monkeypatch.setattr(engine.engine, "step", gated_step)
    greedy = dict(temperature=0.0, ignore_eos=True)

    async def scenario():
        go_on.set()
        busy = engine.generate("Hello world", SamplingParams(max_tokens=30, **greedy))
        await busy.__anext__()
        go_on.clear()
        in_step.clear()
        await asyncio.to_thread(in_step.wait, 120)  # the engine is held inside its next step
        waiting = asyncio.create_task(engine.generate("Paris", SamplingParams(max_tokens=5, **greedy)).__anext__())
        await _until(lambda: engine._commands.qsize() > 0)  # its request is queued, not yet taken
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)  # cancelled while it waits for the engine
        assert engine._commands.qsize() > 0 and in_step.is_set()  # ...which has not taken it yet
        go_on.set()
        await busy.aclose()
        return [out async for out in engine.generate("Hello", SamplingParams(max_tokens=3, **greedy))]

    outs = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
    monkeypatch.undo()
    assert outs[-1].finished and len(outs[-1].token_ids) == 3
    asyncio.run(_until(lambda: engine.stats().num_running == 0 and engine.engine.requests == {}))


async def _until(condition, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        await asyncio.sleep(0.005)
