"""`expo-serve serve --tensor-parallel-size 2`, a real server process with a worker process: it
answers the openai client with what one rank answers; SIGTERM stops every rank; a worker that
dies turns /health into 503 and the server exits non-zero within seconds, never hangs.

Every wait polls a condition with a generous deadline (it only bounds a failure)."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import openai
import psutil
from server_process import ServerProcess, serve_command

from expo_serve import LLM, SamplingParams

WORKER = re.compile(r"worker pids rank 1 (\d+)")
MESSAGES = [{"role": "user", "content": "Paris is the capital of"}]


def _start(pairs, tmp_path) -> tuple[ServerProcess, int]:
    sft, aligned = pairs("qwen2")
    server = ServerProcess(serve_command(sft, aligned, "--tensor-parallel-size", "2"), tmp_path / "server.log")
    found = WORKER.search(server.log())
    assert found, server.log()
    return server, int(found.group(1))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_two_ranks_answer_the_openai_client_and_sigterm_stops_every_rank(pairs, tmp_path):
    sft, aligned = pairs("qwen2")
    with LLM(str(sft), aligned=str(aligned)) as one:
        expected = one.chat([MESSAGES], SamplingParams(alpha=2.5, max_tokens=6, temperature=0.0))[0].text
    server, worker = _start(pairs, tmp_path)
    try:
        ranks = psutil.Process(server.process.pid).children(recursive=True)
        assert worker in [p.pid for p in ranks]
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model=server.model, messages=MESSAGES, max_tokens=6,
                                                               temperature=0.0, extra_body={"alpha": 2.5})
        reply = raw.parse()
        assert raw.headers["x-expo-alpha"] == "2.5"
        assert reply.choices[0].message.content == expected
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.log()
    _wait_until(lambda: all(_gone(p.pid) for p in ranks), 30, "every rank has exited")


def test_a_dead_worker_fails_the_server_loudly(pairs, tmp_path):
    server, worker = _start(pairs, tmp_path)
    try:
        # A stream in flight when the worker dies ends (with an error), never hangs.
        lines: list[str] = []
        first_text, ended = threading.Event(), threading.Event()

        def stream() -> None:
            body = {"model": server.model, "prompt": "Paris is the capital of", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}
            try:
                with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        if '"text":' in line:
                            first_text.set()
            except httpx.HTTPError as exc:
                lines.append(f"client error: {exc!r}")
            finally:
                ended.set()

        threading.Thread(target=stream, daemon=True).start()
        assert first_text.wait(60), lines
        os.kill(worker, signal.SIGKILL)
        seen: list[httpx.Response] = []

        def health_failed() -> bool:
            seen.append(httpx.get(server.url + "/health"))
            return seen[-1].status_code == 503

        _wait_until(health_failed, 30, "/health answers 503")
        assert seen[-1].json() == {"status": "failed"}
        assert ended.wait(30), "the stream in flight did not end"
        assert not any('"finish_reason":"length"' in line.replace(" ", "") for line in lines), "it was not cut"
        server.process.wait(timeout=30)
        assert server.process.returncode not in (0, None)
        assert "tensor-parallel worker rank 1" in server.log()
    finally:
        server.stop(signal.SIGKILL)
