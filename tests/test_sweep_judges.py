"""The sweep's other judges and its experiments file: a reward model saved here, an OpenAI-compatible judge
that always says "first" (a tiny HTTP app in the test), a real `expo-serve serve` as the judge, and the
written experiments.yaml starting a real server."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from server_process import ServerProcess, long_context_pair, parse_metrics, serve_command
from sweep_helpers import read_samples, write_prompts

from expo_serve import sweep

PROMPTS = ["Hello world", "The quick brown fox", "Paris is the capital of"]


def test_reward_model_scores_equal_the_models_own_outputs(pairs, tmp_path):
    from factories import make_config, make_tokenizer
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    config = make_config("llama")
    config.num_labels = 1
    torch.manual_seed(5)
    rm = LlamaForSequenceClassification(config).eval()
    tokenizer = make_tokenizer()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    sft, aligned = pairs("llama")
    out = tmp_path / "out"
    sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), alphas="0.5,1.5",
          judge=f"reward-model:{tmp_path / 'rm'}", out=str(out), max_tokens=12)
    samples = read_samples(out)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    lengths = set()
    for s in samples:
        conversation = [{"role": "user", "content": PROMPTS[int(s["id"][1:])]}, {"role": "assistant", "content": s["text"]}]
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        lengths.add(len(ids))
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()  # one sequence, no padding
        assert s["score"] == pytest.approx(expected, abs=1e-4), s
    assert len(lengths) > 1  # the batch was padded: its rows had different lengths
    assert len({round(s["score"], 6) for s in samples}) > 1


# -- an OpenAI-compatible judge in the test: "first" always, or the longer answer ------------------

class _Judge(BaseHTTPRequestHandler):
    asked: list[dict] = []

    def log_message(self, *args):
        pass

    def _send(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        assert self.path == "/v1/models"
        self._send({"object": "list", "data": [{"id": "always-first", "object": "model"}]})

    def do_POST(self):
        assert self.path == "/v1/chat/completions"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        first, second = answers(text)
        self.asked.append({"model": body["model"], "first": first, "second": second})
        if body["model"] == "longer":
            verdict = "First." if len(first) > len(second) else "second" if len(second) > len(first) else "tie"
        else:
            verdict = "first"
        self._send({"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}]})


def answers(judging_prompt: str) -> tuple[str, str]:
    found = re.search(r"\[First answer\]\n(.*)\n\n\[Second answer\]\n(.*)\n\nReply with", judging_prompt, re.S)
    return found.group(1), found.group(2)


@pytest.fixture
def fake_judge():
    _Judge.asked = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _pairs_against_control(samples):
    control = {s["id"]: s for s in samples if s["alpha"] == 0.0}
    return [(s, control[s["id"]]) for s in samples if s["alpha"] != 0.0]


def test_a_judge_that_always_says_first_gives_fifty_percent(pairs, tmp_path, fake_judge):
    sft, aligned = pairs("llama")
    out = tmp_path / "out"
    result = sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p.jsonl", PROMPTS)),
                   alphas="0.5,1.5", judge=f"openai:{fake_judge}", out=str(out), max_tokens=10)
    samples = read_samples(out)
    compared = [(s, c) for s, c in _pairs_against_control(samples) if s["token_ids"] != c["token_ids"]]
    assert compared, "every answer equalled the control's: nothing was judged"
    # Both orders were asked of each answer, and nothing else.
    asked = sorted((a["first"], a["second"]) for a in _Judge.asked)
    assert asked == sorted([(s["text"], c["text"]) for s, c in compared] + [(c["text"], s["text"]) for s, c in compared])
    assert {a["model"] for a in _Judge.asked} == {"always-first"}  # found through /v1/models
    for s, _ in compared:
        assert s["score"] == 0.5 and s["verdicts"] == ["first", "first"]
    for row in json.loads((out / "results.json").read_text())["per_alpha"]:
        assert row["win_rate"] == 0.5, row  # not 100%: position bias cancels
    assert result.recommendation.alpha == 0.0 and not result.recommendation.beats_control


def test_pairwise_verdicts_map_to_the_right_answer(pairs, tmp_path, fake_judge):
    """A judge that prefers the longer answer in either position: the sweep's preference follows length."""
    sft, aligned = pairs("llama")
    out = tmp_path / "out"
    sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), alphas="0.5,1.5",
          judge=f"openai:{fake_judge}#longer", out=str(out), max_tokens=10)
    for s, c in _pairs_against_control(read_samples(out)):
        if s["token_ids"] == c["token_ids"]:
            assert s["score"] == 0.5 and s["verdicts"] == []
        else:
            longer = (len(s["text"]) > len(c["text"])) - (len(s["text"]) < len(c["text"]))
            assert s["score"] == {1: 1.0, 0: 0.5, -1: 0.0}[longer], s


# -- real servers: the experiments file starts one, which then judges another sweep ---------------

def test_experiments_file_starts_a_server_that_then_judges_a_sweep(pairs, tmp_path):
    sft, aligned = long_context_pair(pairs, "qwen2-judge", context=2048)  # the judging prompt is long in a tiny BPE
    first = tmp_path / "first"
    result = sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p.jsonl", PROMPTS)),
                   alphas="0.25,0.5,1", judge="implicit", out=str(first), max_tokens=8, arms=2)
    assert len(result.arms) == 2
    server = ServerProcess(serve_command(sft, aligned, "--experiments", str(first / "experiments.yaml")), tmp_path / "server.log")
    try:
        listed = httpx.get(server.url + "/v1/experiments").json()
        experiments = listed["data"] if isinstance(listed, dict) else listed
        experiment = next(e for e in experiments if e["key"] == "alpha-sweep")
        assert sorted(arm["alpha"] for arm in experiment["arms"]) == sorted([0.0, *result.arms])
        reply = httpx.post(server.base_url + "/chat/completions", timeout=120, json={
            "model": server.model, "max_tokens": 2, "user": "u1", "messages": [{"role": "user", "content": "hi"}]}).json()
        assert reply["expo"]["experiment"] == "alpha-sweep"
        assert reply["expo"]["alpha"] in [0.0, *result.arms]

        before = parse_metrics(httpx.get(server.url + "/metrics").text).get("expo:request_success_total", 0.0)
        second = tmp_path / "second"
        sweep(str(sft), aligned=str(aligned), prompts=str(write_prompts(tmp_path / "p2.jsonl", PROMPTS[:2])), alphas="1",
              judge=f"openai:{server.base_url}#{server.model}", out=str(second), max_tokens=6)
        after = parse_metrics(httpx.get(server.url + "/metrics").text)["expo:request_success_total"]
        judged = [(s, c) for s, c in _pairs_against_control(read_samples(second)) if s["token_ids"] != c["token_ids"]]
        assert judged
        assert after - before == 2 * len(judged)  # the server answered both orders of every pair
        for s, _ in judged:
            assert len(s["verdicts"]) == 2 and all(isinstance(v, str) for v in s["verdicts"])
            assert s["score"] in (0.0, 0.5, 1.0)
    finally:
        assert server.stop() == 0
