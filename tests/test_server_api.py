"""The OpenAI-compatible API, black-box: a real server process driven by the `openai` package and httpx.

α results are checked against the engine run in-process (expo_serve.LLM), which the engine's own
tests check against Hugging Face's reference merge.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from expo_serve import LLM, SamplingParams
from server_process import CLEAN_EXIT, ServerProcess, run_printed_examples, serve_command, sse_events

MODEL = "tiny-expo"
MAX_MODEL_LEN = 128
QUESTION = [{"role": "user", "content": "Hello world! How are you today?"}]
# Roles beyond these make the template raise, so a template error can be provoked on purpose.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def pair(pairs):
    sft, aligned = pairs("qwen2-server")
    for folder in (sft, aligned):
        (folder / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return sft, aligned


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    command = serve_command(*pair, "--model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), "--alpha-max", "10")
    proc = ServerProcess(command, tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    assert proc.stop() in CLEAN_EXIT, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def llm(pair):
    sft, aligned = pair
    return LLM(str(sft), aligned=str(aligned), max_model_len=MAX_MODEL_LEN)


def _greedy(alpha: float, max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(alpha=alpha, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def _chat(client, alpha=None, max_tokens=12, **kw):
    extra = {"ignore_eos": True} | ({"alpha": alpha} if alpha is not None else {}) | kw.pop("extra_body", {})
    return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra, **kw)


# -- streaming ---------------------------------------------------------------------------------------
def test_stream_has_role_first_one_finish_per_choice_usage_last_and_done(client, http):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=2, temperature=0.8,
                                            seed=3, stream=True, stream_options={"include_usage": True},
                                            extra_body={"alpha": 0.5, "ignore_eos": True})
    chunks = list(stream)
    first = chunks[0]
    assert {c.delta.role for c in first.choices} == {"assistant"} and len(first.choices) == 2
    assert first.model_extra["expo"] == {"alpha": 0.5, "experiment": None, "arm": None, "exposure_id": None}
    assert all("expo" not in (c.model_extra or {}) for c in chunks[1:])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    finishes = [(choice.index, choice.finish_reason) for c in chunks for choice in c.choices if choice.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert all(c.usage is None for c in chunks[:-1])
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            assert choice.model_extra["alpha"] == 0.5

    body = {"messages": QUESTION, "max_tokens": 4, "stream": True, "alpha": 0.5}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        raw = response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-expo-alpha"] == "0.5"
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert all("usage" not in json.loads(e) for e in events[:-1])  # include_usage not asked for


def test_streamed_text_equals_whole_text_at_temperature_zero(client):
    whole = _chat(client, alpha=0.3, max_tokens=20)
    text = whole.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, alpha=0.3, max_tokens=20, stream=True)
                       if c.choices)
    assert streamed == text and len(text) > 5
    # With a stop string that occurs: text that might begin it is held back, never streamed.
    stop = text[4:7]
    cut = _chat(client, alpha=0.3, max_tokens=20, stop=stop)
    streamed_cut = "".join(c.choices[0].delta.content or "" for c in _chat(client, alpha=0.3, max_tokens=20, stop=stop,
                                                                            stream=True) if c.choices)
    assert cut.choices[0].message.content == streamed_cut == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    prompt = "The quick brown fox"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, echo=True,
                                      extra_body={"alpha": 1.5})
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, echo=True,
                                       stream=True, extra_body={"alpha": 1.5})
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith(prompt)


# -- α -------------------------------------------------------------------------------------------------
def test_alpha_changes_the_answer_and_equals_the_engine_at_that_alpha(client, llm, http):
    answers = {}
    for alpha in (0.0, 2.5):
        reply = _chat(client, alpha=alpha)
        expected = llm.chat(QUESTION, _greedy(alpha))[0]
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)
        assert reply.model_extra["expo"]["alpha"] == alpha and reply.choices[0].model_extra["alpha"] == alpha
        answers[alpha] = expected.token_ids
    assert answers[0.0] != answers[2.5]

    # Token-id prompts through /v1/completions, and the α header of a plain HTTP response.
    ids = llm.tokenizer.encode("Paris is the capital of", add_special_tokens=False)
    response = http.post("/v1/completions", json={"prompt": ids, "alpha": 2.5, "max_tokens": 10, "temperature": 0,
                                                  "ignore_eos": True})
    assert response.status_code == 200 and response.headers["x-expo-alpha"] == "2.5"
    assert response.json()["choices"][0]["text"] == llm.generate([ids], _greedy(2.5, 10))[0].text


def test_no_alpha_means_the_default(client, llm):
    reply = _chat(client)
    assert reply.model_extra["expo"]["alpha"] == 0.0
    assert reply.choices[0].message.content == llm.chat(QUESTION, _greedy(0.0))[0].text


def test_alpha_sweep_gives_one_choice_per_alpha_in_one_request(client, llm, http):
    alphas = [-1.0, 0.0, 2.5]
    reply = _chat(client, n=2, extra_body={"alpha": alphas})
    assert [c.index for c in reply.choices] == list(range(6))
    assert [c.model_extra["alpha"] for c in reply.choices] == [a for a in alphas for _ in range(2)]
    assert reply.model_extra["expo"]["alpha"] == alphas
    for choice in reply.choices:
        assert choice.message.content == llm.chat(QUESTION, _greedy(choice.model_extra["alpha"]))[0].text
    assert reply.usage.completion_tokens == 6 * 12
    assert reply.usage.prompt_tokens == llm_prompt_tokens(http)  # the prompt counts once

    stream = _chat(client, n=2, stream=True, extra_body={"alpha": alphas})
    texts = [""] * 6
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]
    raw = http.post("/v1/chat/completions", json={"messages": QUESTION, "alpha": alphas, "max_tokens": 2})
    assert raw.headers["x-expo-alpha"] == "-1.0,0.0,2.5"


def llm_prompt_tokens(http) -> int:
    return http.post("/tokenize", json={"messages": QUESTION}).json()["count"]


# -- usage, logprobs, prompts ---------------------------------------------------------------------------
def test_usage_adds_up(client, http):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=7, n=3, seed=1,
                                           logprobs=True, extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens == llm_prompt_tokens(http)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices) == 21
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    texts = ["Hello world", "The quick brown fox jumps"]
    counts = [http.post("/tokenize", json={"prompt": t}).json()["count"] for t in texts]
    batch = client.completions.create(model=MODEL, prompt=texts, max_tokens=3, extra_body={"alpha": [0.0, 1.0],
                                                                                           "ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.model_extra["alpha"] for c in batch.choices] == [0.0, 1.0, 0.0, 1.0]
    assert batch.usage.prompt_tokens == sum(counts) and batch.usage.completion_tokens == 12


def test_chat_logprobs_match_the_engine(client, llm):
    reply = _chat(client, alpha=0.7, max_tokens=6, logprobs=True, top_logprobs=3)
    expected = llm.chat(QUESTION, _greedy(0.7, 6, logprobs=3))[0].outputs[0]
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for entry, want in zip(content, expected.logprobs):
        assert entry.token == llm.tokenizer.decode([want.token_id])
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy picks the best


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client, llm):
    ids = llm.tokenizer.encode("Rome is the capital of Italy.", add_special_tokens=False)
    expected = llm.generate([ids], SamplingParams(alpha=0.4, max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
    # lm-evaluation-harness's loglikelihood request: echo, logprobs 1, one generated token.
    reply = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], echo=True, logprobs=1, max_tokens=1,
                                      temperature=0, extra_body={"alpha": 0.4})
    full = reply.choices[0].logprobs
    assert len(full.tokens) == len(ids) + 1 and full.token_logprobs[0] is None and full.top_logprobs[0] is None
    for got, want in zip(full.token_logprobs[1:len(ids)], expected[1:]):
        assert got == pytest.approx(want.logprob, abs=1e-4)
    assert reply.choices[0].text.startswith("Rome is the capital of Italy.")
    assert len(reply.choices[1].logprobs.tokens) == 5
    # Scoring only: max_tokens 0 generates nothing.
    scored = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=0,
                                       extra_body={"alpha": 0.4})
    assert len(scored.choices[0].logprobs.tokens) == len(ids) and scored.usage.completion_tokens == 0
    assert scored.choices[0].text == "Rome is the capital of Italy."


def test_prompts_as_text_lists_and_token_ids(client, http):
    ids = http.post("/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    for prompt, count in (("def add(a, b):", 1), (["def add(a, b):", "Hello"], 2), (ids, 1), ([ids, ids[:3]], 2)):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=2,
                                          extra_body={"ignore_eos": True})
        assert [c.index for c in reply.choices] == list(range(2 * count))
        assert reply.id.startswith("cmpl-")


def test_seed_stop_n_and_both_max_token_names(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=1.0,
                                              seed=seed, n=3, extra_body={"ignore_eos": True, "alpha": 0.2})
    first, again, other = sample(11), sample(11), sample(12)
    contents = [c.message.content for c in first.choices]
    assert contents == [c.message.content for c in again.choices]
    assert contents != [c.message.content for c in other.choices]
    short = _chat(client, max_tokens=20, extra_body={"max_completion_tokens": 5})
    assert short.usage.completion_tokens == 5  # max_completion_tokens wins over max_tokens
    text = _chat(client, max_tokens=20).choices[0].message.content
    stops = [text[8:10], text[2:5]]
    cut = _chat(client, max_tokens=20, stop=stops)
    assert cut.choices[0].message.content == text[: min(text.index(s) for s in stops)]


# -- errors ------------------------------------------------------------------------------------------------
BAD_CHAT = [
    ({"alpha": "0.3"}, "alpha"), ({"alpha": True}, "alpha"), ({"alpha": 10.5}, "alpha"), ({"alpha": -1.5}, "alpha"),
    ({"alpha": []}, "alpha"), ({"alpha": [0.1] * 9}, "alpha"), ({"alpha": [0.1, "x"]}, "alpha"),
    ({"alpha": [0.1, 50]}, "alpha"), ({"alpha": {"value": 1}}, "alpha"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 500}, "max_tokens"), ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"), ({"messages": []}, "messages"), ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # the template raises
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"experiment": "exp", "alpha": 0.3}, "alpha"), ({"n": 100, "alpha": [0.0] * 8}, "n"),
]


@pytest.mark.parametrize("patch,param", BAD_CHAT, ids=[json.dumps(p)[:40] for p, _ in BAD_CHAT])
def test_bad_chat_requests_are_400_with_the_param(http, patch, param):
    body = {"messages": QUESTION, "max_tokens": 4} | patch
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_alpha_is_400(http, literal):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "alpha": %s}' % literal
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "alpha"


def test_other_bad_requests(http, client):
    long_prompt = list(range(5, 5 + MAX_MODEL_LEN + 1))
    response = http.post("/v1/completions", json={"prompt": long_prompt})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    for raw in (b"{not json", b"[1, 2]", b""):
        response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
    assert http.post("/v1/completions", json={"prompt": [1, 99999]}).json()["error"]["param"] == "prompt"
    assert http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}).json()["error"]["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, alpha=11.0)
    assert err.value.body["param"] == "alpha"
    assert http.get("/v1/nowhere").status_code == 404 and "error" in http.get("/v1/nowhere").json()
    assert http.get("/v1/chat/completions").status_code == 405


def test_unknown_model_and_experiment_are_404(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert err.value.code == "model_not_found"
    response = http.post("/v1/chat/completions", json={"messages": QUESTION, "experiment": "exp"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "experiment_not_found"


def test_unknown_fields_are_ignored_and_model_may_be_omitted(http):
    body = {"messages": QUESTION, "max_tokens": 3, "frobnicate": {"x": 1}, "parallel_tool_calls": True,
            "user": "u-1", "metadata": {"a": "b"}}
    response = http.post("/v1/chat/completions", json=body, headers={"X-ExPO-Unit": "unit-7"})
    assert response.status_code == 200 and response.json()["model"] == MODEL


# -- the other routes ----------------------------------------------------------------------------------------
def test_models_health_tokenize_detokenize(client, http, llm):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert http.get("/health").json() == {"status": "ok"}
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["tokens"] == llm.tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokens["count"] == len(tokens["tokens"])
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert http.post("/detokenize", json={"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={}).status_code == 400


def test_metrics_expose_engine_state_latencies_and_tokens_by_arm(server, client):
    before = server.metrics()
    _chat(client, alpha=0.1, max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    for name in ("expo:num_requests_running", "expo:num_requests_waiting", "expo:kv_cache_usage_perc",
                 "expo:time_to_first_token_seconds_bucket", "expo:inter_token_latency_seconds_bucket",
                 "expo:e2e_request_latency_seconds_bucket", "expo:prompt_tokens_total",
                 "expo:generation_tokens_total"):
        assert name in text, name
    assert 'expo:generation_tokens_total{arm="",model_name="tiny-expo"}' in text
    after = server.metrics()
    assert after["expo:generation_tokens_total"] - before.get("expo:generation_tokens_total", 0) == 5
    assert after["expo:time_to_first_token_seconds_count"] - before.get("expo:time_to_first_token_seconds_count", 0) == 1
    assert after["expo:num_requests_running"] == 0 and after["expo:kv_cache_usage_perc"] == 0


def test_the_printed_examples_work_as_printed(server):
    reply, printed = run_printed_examples(server.log())
    assert reply["expo"]["alpha"] == 0.3 and reply["choices"][0]["message"]["role"] == "assistant"
    assert "'alpha': 0.3" in printed.splitlines()[-1]


def test_models_retrieve_through_the_openai_client(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("another-model")
    assert caught.value.body["code"] == "model_not_found"


def test_a_streamed_event_is_one_line_even_for_clients_that_split_like_splitlines():
    """A token may decode to NEL, LS or PS; httpx's aiter_lines (as str.splitlines) breaks lines
    there, so the event escapes them (the JSON means the same)."""
    import json

    from pydantic import BaseModel

    from expo_serve.server.serving import wire

    class Chunk(BaseModel):
        text: str

    text = "a\x85b\u2028c\u2029d\ne\rf é"
    line = wire(Chunk(text=text))
    assert line.splitlines() == [line]
    assert json.loads(line) == {"text": text}
