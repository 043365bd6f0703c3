"""A real `expo-serve serve` process on localhost for the server tests.

It listens on a port the kernel picks (--port 0) and says which in the banner it prints once
ready, so parallel runs never race for a port. Its output goes to a log file (a pipe nobody reads
would fill and stall it), shown when a test fails to start it.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

# A server stopped by SIGTERM or SIGINT drains and exits with 0.
CLEAN_EXIT = (0,)
BANNER = re.compile(r"expo-serve: serving (\S+) at (http://\S+)")


def serve_command(sft: Path, aligned: Path, *options: str) -> list[str]:
    """`expo-serve serve` on a free loopback port with a small KV cache (options may override)."""
    return [sys.executable, "-m", "expo_serve", "serve", "--sft", str(sft), "--aligned", str(aligned),
            "--host", "127.0.0.1", "--port", "0", "--kv-cache-gib", "0.05", *options]


class ServerProcess:
    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 start_timeout: float = 300.0):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.model, self.url = self._wait_for_banner(start_timeout)
        self.base_url = self.url + "/v1"

    def _wait_for_banner(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = BANNER.search(self.log())
            if found:
                return found.group(1), found.group(2)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text()

    def metrics(self) -> dict[str, float]:
        """The unlabelled-or-single-series value of each expo: metric, summed over labels."""
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def sse_events(raw: str) -> list[str]:
    """The data of each server-sent event, in order."""
    return [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]


def sse_json(raw: str) -> list[dict]:
    return [json.loads(data) for data in sse_events(raw) if data != "[DONE]"]


def run_printed_examples(log: str) -> tuple[dict, str]:
    """Run the curl and openai-client examples exactly as the server printed them, in bash with the
    environment as it is (the Python example names an interpreter that has the openai package);
    returns the curl reply and what the Python example printed."""
    curl = log[log.index("curl -s"): log.index("\n\n", log.index("curl -s"))]
    start = log.rindex("\n", 0, log.index(" - <<'PY'")) + 1
    python = log[start: log.index("\nPY", start) + 3]
    env = dict(os.environ)
    reply = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, check=True).stdout
    done = subprocess.run(["bash", "-c", python], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(reply), done.stdout


def long_context_pair(pairs, name: str = "qwen2-long", context: int = 2048) -> tuple[Path, Path]:
    """A tiny pair with a `context`-token window, so that a request told to generate most of it is
    still running when a test acts on it."""
    sft, aligned = pairs(name)
    for folder in (sft, aligned):
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = context
        (folder / "config.json").write_text(json.dumps(config))
    return sft, aligned


class LiveStream:
    """A streaming response whose events are read in the background, as a live client would."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.lines: list[str] = []
        self.first_text = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.response.aiter_lines():
            self.lines.append(line)
            data = json.loads(line[6:]) if line.startswith("data: {") else {}
            for choice in data.get("choices", ()):
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    self.first_text.set()

    def events(self) -> list[str]:
        return sse_events("\n".join(self.lines))

    async def close(self) -> None:
        """Hang up, as a client that goes away does."""
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.response.aclose()


async def open_stream(client: httpx.AsyncClient, body: dict, path: str = "/v1/completions",
                      timeout: float = 120) -> LiveStream:
    """Send a streaming request and return once its first text has arrived (it is running)."""
    response = await client.send(client.build_request("POST", path, json=body), stream=True)
    assert response.status_code == 200, await response.aread()
    stream = LiveStream(response)
    await asyncio.wait_for(stream.first_text.wait(), timeout=timeout)
    return stream


def parse_metrics(text: str) -> dict[str, float]:
    """Each expo: metric's value, summed over its labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("expo:"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{", 1)[0]
            values[key] = values.get(key, 0.0) + float(value)
    return values


async def wait_for_metrics(url: str, condition: Callable[[dict], bool], timeout: float = 120.0,
                           headers: dict | None = None) -> dict[str, float]:
    """Poll /metrics until `condition(metrics)` holds (a generous `timeout` only bounds a failure)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        while True:
            metrics = parse_metrics((await client.get("/metrics")).text)
            if condition(metrics):
                return metrics
            assert time.monotonic() < deadline, f"not within {timeout} s: {metrics}"
            await asyncio.sleep(0.02)
