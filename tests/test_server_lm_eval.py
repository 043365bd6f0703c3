"""The demo pair served by serve_demo, driven by lm-evaluation-harness and by the printed examples.

Slow (minutes): prepares the demo pair if it is not cached, then runs lm-eval's `local-completions`
on a multiple-choice task (loglikelihood: echo + logprobs) and `local-chat-completions` on a
generate_until task, both shipped in bench/lm_eval_tasks (no dataset hub).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import CLEAN_EXIT, ServerProcess, run_printed_examples

pytestmark = pytest.mark.slow

TASKS = Path(__file__).resolve().parent.parent / "bench" / "lm_eval_tasks"
SERVE_DEMO = ("from expo_serve.demo.pair import prepare_demo_pair; from expo_serve.server.runner import serve_demo; "
              "serve_demo(prepare_demo_pair(), port=0, kv_cache_gib=1.0)")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    proc = ServerProcess([sys.executable, "-c", SERVE_DEMO], tmp_path_factory.mktemp("demo") / "server.log",
                         start_timeout=1800)
    yield proc
    assert proc.stop() in CLEAN_EXIT, proc.log()


def _lm_eval(model: str, model_args: str, task: str, limit: int, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", task,
               "--include_path", ".", "--limit", str(limit), "--output_path", str(out), *extra]
    run = subprocess.run(command, cwd=TASKS, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(run.stdout)  # the results table, for bench/RESULTS.md
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return results["results"][task] | {"n": results["n-samples"][task]["effective"]}


def test_lm_eval_multiple_choice_through_completions(demo_server, tmp_path):
    from expo_serve.demo.pair import prepare_demo_pair

    args = (f"model={demo_server.model},base_url={demo_server.base_url}/completions,"
            f"tokenizer={prepare_demo_pair().aligned_dir},tokenizer_backend=huggingface,num_concurrent=4,max_retries=1")
    result = _lm_eval("local-completions", args, "expo_mc", 20, tmp_path)
    assert result["n"] == 20
    # Easy questions: a model whose logprobs reach lm-eval intact is well above chance (0.25).
    assert result["acc,none"] >= 0.5, result


def test_lm_eval_generate_until_through_chat_completions(demo_server, tmp_path):
    args = f"model={demo_server.model},base_url={demo_server.base_url}/chat/completions,num_concurrent=4,max_retries=1"
    result = _lm_eval("local-chat-completions", args, "expo_gen", 12, tmp_path, "--apply_chat_template")
    assert result["n"] == 12 and 0.0 <= result["exact_match,last-number"] <= 1.0


def test_the_printed_examples_work_on_the_demo_pair(demo_server):
    reply, printed = run_printed_examples(demo_server.log())
    assert reply["model"] == demo_server.model and reply["choices"][0]["message"]["content"].strip()
    assert printed.strip() and "'alpha': 0.3" in printed.splitlines()[-1]
