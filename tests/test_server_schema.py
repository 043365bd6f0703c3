"""Schemathesis against a live server: whatever it generates from /openapi.json, no 5xx answers."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from server_process import CLEAN_EXIT, ServerProcess, serve_command

EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def server(pairs, tmp_path_factory):
    # A short context window and few sequences per request keep every generated request quick
    # (a request for more sequences gets a 400), even on a busy machine.
    options = ("--max-model-len", "32", "--max-num-seqs", "8", "--max-queue", "8")
    proc = ServerProcess(serve_command(*pairs("qwen2"), *options), tmp_path_factory.mktemp("schema") / "server.log")
    yield proc
    assert proc.stop() in CLEAN_EXIT, proc.log()


def _operation_count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as response:
        spec = json.load(response)
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return sum(method in methods for path in spec["paths"].values() for method in path)


def test_generated_requests_never_get_a_server_error(server, tmp_path):
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
               f"{server.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "20261128", "--workers", "1",
               "--generation-database", "none", "--request-timeout", "60", "--no-color", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    operations = _operation_count(server.url)
    assert f"{operations} selected / {operations} total" in run.stdout, run.stdout[-6000:]  # every route tried
    assert "Traceback" not in server.log(), server.log()[-6000:]
