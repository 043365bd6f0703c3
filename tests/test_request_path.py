"""The path of one request stays short (DESIGN.md §8, docs/architecture.md): a streamed chat request
with `alpha`, behind an API key, runs code in at most 14 of the project's files, from the first
middleware to the kernel and back, the engine thread included.

Counted with a profiler hook on every thread (the engine thread is started under it); a file
counts when any function defined in it is called while the request is served.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import httpx

from expo_serve.engine.async_engine import AsyncEngine
from expo_serve.engine.llm_engine import EngineConfig, LLMEngine
from expo_serve.server.app import create_app
from expo_serve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
PROJECT = (str(ROOT / "expo_serve"), str(ROOT / "kernels"))
MAX_FILES = 14


class FileTrace:
    """The project files whose functions are called while `active`."""

    def __init__(self):
        self.active = False
        self.files: set[str] = set()

    def __call__(self, frame, event, arg) -> None:
        if self.active and event == "call" and frame.f_code.co_filename.startswith(PROJECT):
            self.files.add(str(Path(frame.f_code.co_filename).relative_to(ROOT)))


def _files_of_one_chat_request(pairs, **engine_options) -> set[str]:
    sft, aligned = pairs("qwen2")
    trace = FileTrace()
    threading.setprofile(trace)  # the engine thread starts under the hook
    try:
        engine = AsyncEngine(LLMEngine(EngineConfig(sft=str(sft), aligned=str(aligned), max_model_len=128,
                                                    kv_cache_bytes=2**24, **engine_options)))
    finally:
        threading.setprofile(None)
    app = create_app(ServerSettings(sft="unused", aligned="unused", model_name="tiny", api_key="k"), engine)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "alpha": 0.5, "max_tokens": 4,
            "stream": True}

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": "Bearer k"}) as client:
            warm = await client.post("/v1/chat/completions", json=body)  # first-use work is not the path
            assert warm.status_code == 200, warm.text
            trace.files.clear()
            sys.setprofile(trace)
            trace.active = True
            try:
                served = await client.post("/v1/chat/completions", json=body)
            finally:
                trace.active = False
                sys.setprofile(None)
            assert served.status_code == 200 and served.text.rstrip().endswith("data: [DONE]"), served.text

    try:
        asyncio.run(requests())
    finally:
        engine.shutdown()
    return trace.files


def test_a_chat_request_touches_at_most_14_files(pairs):
    # No α cache: every linear layer then takes the fused ExPO path down to expo_kernels.
    files = _files_of_one_chat_request(pairs, alpha_cache_bytes=0)
    assert "kernels/expo_kernels/linear.py" in files  # the trace reaches the kernel
    assert len(files) <= MAX_FILES, "\n".join(sorted(files))


def test_with_the_alpha_cache_the_path_is_no_longer(pairs):
    files = _files_of_one_chat_request(pairs)
    assert len(files) <= MAX_FILES, "\n".join(sorted(files))
