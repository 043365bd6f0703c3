"""Schemathesis against a live server, every check: whatever it generates from /openapi.json gets no
5xx, each answer matches the documented statuses, bodies and headers, and what the schema calls
valid is accepted (but for the one kind of rule no JSON Schema can state: below)."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from server_process import CLEAN_EXIT, ServerProcess, serve_command

EXAMPLES_PER_OPERATION = 20
# A schema-valid generation request may still be refused with its documented 400: its prompt plus
# max_tokens must fit the context window, its sequences the server's batch, `best_of` must equal
# `n`; none of these is a property of the body alone.
CONFIG = """
[[operations]]
include-path-regex = "^/v1/(chat/)?completions$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "429", "503"]
"""


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


def test_generated_requests_get_documented_answers_and_never_a_server_error(server, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
               "--config-file", str(tmp_path / "schemathesis.toml"), "run",
               f"{server.url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "20261128", "--workers", "1",
               "--generation-database", "none", "--request-timeout", "60", "--no-color", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    operations = _operation_count(server.url)
    assert f"{operations} selected / {operations} total" in run.stdout, run.stdout[-6000:]  # every route tried
    assert "Traceback" not in server.log(), server.log()[-6000:]
