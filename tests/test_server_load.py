"""Disconnects abort, the queue is bounded, shutdown drains: real server processes under load.

The pair here has a 2048-token context, so a request told to generate 1,500 tokens is still
running when the test acts on it: an abort cannot be mistaken for a request that just finished.
"""
from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from server_process import (CLEAN_EXIT, ServerProcess, long_context_pair, open_stream, serve_command, sse_events,
                            wait_for_metrics)

LONG = 1500  # tokens: far more than any test waits for


@pytest.fixture(scope="module")
def long_pair(pairs):
    return long_context_pair(pairs)


@pytest.fixture(scope="module")
def server(long_pair, tmp_path_factory):
    proc = ServerProcess(serve_command(*long_pair), tmp_path_factory.mktemp("load") / "server.log")
    yield proc
    assert proc.stop() in CLEAN_EXIT, proc.log()


def _stream_body(i: int, max_tokens: int = LONG) -> dict:
    return {"prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "alpha": [0.0, 0.5, 2.0][i % 3]}


async def _open_stream(client: httpx.AsyncClient, body: dict):
    return await open_stream(client, body)


async def _wait_until(server: ServerProcess, condition, timeout: float = 60.0) -> dict:
    """Once `condition(metrics)` holds (the timeout only bounds a failure: it is no claim on speed)."""
    return await wait_for_metrics(server.url, condition, timeout)


def _idle(m: dict) -> bool:
    return m["expo:num_requests_running"] == 0 and m["expo:num_requests_waiting"] == 0 \
        and m["expo:kv_cache_usage_perc"] == 0


def test_cancelling_50_streams_frees_everything(server):
    before = server.metrics()

    async def scenario():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            responses = await asyncio.gather(*(_open_stream(client, _stream_body(i)) for i in range(50)))
            running = server.metrics()["expo:num_requests_running"]
            assert running == 50, running
            await asyncio.gather(*(r.close() for r in responses))
            await _wait_until(server, _idle)

    asyncio.run(scenario())
    after = server.metrics()
    # They were aborted, not finished: none succeeded, and far fewer tokens came than were asked.
    assert after.get("expo:request_success_total", 0) == before.get("expo:request_success_total", 0)
    assert after["expo:generation_tokens_total"] - before.get("expo:generation_tokens_total", 0) < 50 * LONG / 4


def test_a_non_streaming_client_that_leaves_aborts_its_request(server):
    before = server.metrics()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            request = asyncio.create_task(client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG, "ignore_eos": True}))
            # It is generating (and, at LONG tokens, far from done) when its client leaves.
            await _wait_until(server, lambda m: m["expo:num_requests_running"] == 1 and m[
                "expo:generation_tokens_total"] > before.get("expo:generation_tokens_total", 0))
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        await _wait_until(server, _idle)

    asyncio.run(scenario())
    after = server.metrics()
    assert after.get("expo:request_success_total", 0) == before.get("expo:request_success_total", 0)
    assert after["expo:generation_tokens_total"] > before.get("expo:generation_tokens_total", 0)  # it had started


def test_a_full_queue_answers_503_with_retry_after(long_pair, tmp_path):
    command = serve_command(*long_pair, "--max-num-seqs", "2", "--max-queue", "2", "--log-level", "warning")
    proc = ServerProcess(command, tmp_path / "server.log")
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=proc.url, timeout=120) as client:
                running = [await _open_stream(client, _stream_body(i)) for i in range(2)]
                # Two more wait in the engine's queue (their responses have not begun).
                queued = [asyncio.create_task(client.post("/v1/completions", json=_stream_body(i) | {"stream": False}))
                          for i in range(2, 4)]
                await _wait_until(proc, lambda m: m["expo:num_requests_waiting"] == 2)
                refused = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 2})
                too_big = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 5})
                for task in queued:  # their clients leave while they wait: they leave the queue too
                    task.cancel()
                await asyncio.gather(*queued, return_exceptions=True)
                for stream in running:
                    await stream.close()
                await _wait_until(proc, _idle)
                after = await client.post("/v1/completions", json={"prompt": "again", "max_tokens": 2})
                return refused, too_big, after

        refused, too_big, after = asyncio.run(scenario())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "too_many_sequences"
        assert after.status_code == 200
        assert 'expo:requests_rejected_total{model_name="aligned",reason="server_overloaded"} 1.0' in \
            httpx.get(proc.url + "/metrics").text
    finally:
        assert proc.stop() in CLEAN_EXIT, proc.log()


def test_shutdown_lets_running_requests_finish(server):
    # Last in this file: it stops the module's server (starting another would cost ~10 s).
    proc = server

    async def scenario():
        async with httpx.AsyncClient(base_url=proc.url, timeout=120) as client:
            stream = await _open_stream(client, _stream_body(0, max_tokens=300) | {"stream_options": {"include_usage": True}})
            whole = asyncio.create_task(client.post("/v1/completions", json=_stream_body(1, max_tokens=300)
                                                    | {"stream": False}))
            await _wait_until(proc, lambda m: m["expo:num_requests_running"] == 2)
            proc.process.send_signal(signal.SIGTERM)
            streamed_before = len(stream.lines)
            await stream.reader
            return streamed_before, "\n".join(stream.lines), await whole

    streamed_before, rest, whole = asyncio.run(scenario())
    assert streamed_before < 300  # both were mid-way when the signal came
    events = sse_events(rest)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 300
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 300
    assert proc.stop() == 0
    assert "Application shutdown complete" in proc.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/health")
