"""SIGTERM on a real server process: it drains, then exits with 0.

While it drains, running requests finish and the socket still accepts: a new request, and the
health check, get 503 with Retry-After (a load balancer can tell draining from dead). At
--shutdown-timeout what is still running is cut cleanly: a stream ends with an error event and
`[DONE]`, a request whose response has not begun gets a 503, each is logged on one line, and the
log holds no traceback. The tests wait on conditions, never on the clock.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from server_process import ServerProcess, long_context_pair, open_stream, serve_command, wait_for_metrics

LONG = 1500  # tokens: running for a while yet when the signal comes


@pytest.fixture(scope="module")
def long_pair(pairs):
    return long_context_pair(pairs)


def _completion(i: int, stream: bool = True) -> dict:
    return {"prompt": f"Request {i}: the quick brown fox", "max_tokens": LONG, "ignore_eos": True, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}


def _chat(stream: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": LONG,
            "ignore_eos": True, "stream": stream}


async def _until(probe, done, timeout: float = 120.0):
    """Call `probe()` until `done(result)`; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result):
            return result
        assert time.monotonic() < deadline, f"not within {timeout} s: {result}"
        await asyncio.sleep(0.02)


def _events(stream) -> list:
    """Every event's data, parsed (a chunk cut in half would fail here)."""
    return [data if data == "[DONE]" else json.loads(data) for data in stream.events()]


def test_sigterm_drains_running_requests_answers_503_meanwhile_and_exits_0(long_pair, tmp_path):
    proc = ServerProcess(serve_command(*long_pair, "--shutdown-timeout", "600"), tmp_path / "server.log")
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=proc.url, timeout=600) as client:
                streams = [await open_stream(client, _completion(0)),
                           await open_stream(client, _chat(), path="/v1/chat/completions")]
                whole = asyncio.create_task(client.post("/v1/completions", json=_completion(2, stream=False)))
                await wait_for_metrics(proc.url, lambda m: m["expo:num_requests_running"] == 3)
                proc.process.send_signal(signal.SIGTERM)
                # A new connection, as a balancer's probe or a new client would open.
                async with httpx.AsyncClient(base_url=proc.url, timeout=60) as other:
                    health = await _until(lambda: other.get("/health"), lambda r: r.status_code == 503)
                    refused = await other.post("/v1/completions", json={"prompt": "one more", "max_tokens": 2})
                    metrics = await other.get("/metrics")  # still served, to watch the drain
                for stream in streams:
                    await stream.reader
                return health, refused, metrics, streams, await whole

        health, refused, metrics, streams, whole = asyncio.run(scenario())
        assert health.json() == {"status": "draining"} and health.headers["retry-after"] == "1"
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert metrics.status_code == 200 and "expo:num_requests_running" in metrics.text
        completion, chat = (_events(s) for s in streams)
        for events in (completion, chat):  # both ran to their end, after the signal
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert completion[-2]["usage"]["completion_tokens"] == LONG
        assert [c["choices"][0].get("finish_reason") for c in chat[:-1] if c["choices"]][-1] == "length"
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == LONG
        assert proc.process.wait(120) == 0, proc.log()
        log = proc.log()
        assert "Traceback" not in log and "cut at the shutdown deadline" not in log
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/health")
    finally:
        proc.stop()


def test_at_the_deadline_streams_end_with_an_error_event_and_done(long_pair, tmp_path):
    # A deadline of 0: whatever runs when the signal comes is cut, however fast the machine.
    proc = ServerProcess(serve_command(*long_pair, "--shutdown-timeout", "0"), tmp_path / "server.log")
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=proc.url, timeout=600) as client:
                streams = [await open_stream(client, _completion(0)), await open_stream(client, _completion(1)),
                           await open_stream(client, _chat(), path="/v1/chat/completions")]
                whole = asyncio.create_task(client.post("/v1/chat/completions", json=_chat(stream=False)))
                await wait_for_metrics(proc.url, lambda m: m["expo:num_requests_running"] == 4)
                proc.process.send_signal(signal.SIGTERM)
                for stream in streams:
                    await stream.reader
                return streams, await whole

        streams, whole = asyncio.run(scenario())
        for stream in streams:
            events = _events(stream)
            assert events[-1] == "[DONE]", events[-3:]
            error = events[-2]["error"]
            assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
            assert len(events) > 3  # it had been streaming, and was cut between two chunks
        assert whole.status_code == 503 and whole.json()["error"]["code"] == "server_shutting_down"
        assert whole.headers["retry-after"] == "1"
        assert proc.process.wait(120) == 0, proc.log()
        log = proc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert log.count("cut at the shutdown deadline") == 4, log  # one line per cut request
    finally:
        proc.stop()
