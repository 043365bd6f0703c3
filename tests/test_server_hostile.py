"""Hostile input (issue 10): lone surrogates in every string field of every route, values out of
range, bodies that are not JSON objects, and what the answers say. Each refusal is a 400 in
OpenAI's envelope naming the field, and the keep-alive connection it came on serves the next
request: one httpx.Client, and the same client address for both."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI

from expo_serve.cli import build_parser
from expo_serve.server.errors import install_error_handlers
from expo_serve.server.middleware import UnexpectedErrorMiddleware
from expo_serve.server.settings import ServerSettings, settings_from_args
from server_process import CLEAN_EXIT, ServerProcess, serve_command

API_KEY, ADMIN_KEY = "api-secret", "admin-secret"
MAX_MODEL_LEN, MAX_TOKENS_DEFAULT = 48, 6
EXPERIMENT = {"key": "ab", "unit": "user", "default": True,
              "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "more", "alpha": 0.5}]}
BAD = "\ud800x"  # a lone surrogate: json.dumps writes it as the escape "\ud800"
MESSAGES = [{"role": "user", "content": "Hello world!"}]
CHAT = {"messages": MESSAGES, "max_tokens": 2}
ADMIN = {"X-Admin-Key": ADMIN_KEY}


@pytest.fixture(scope="module")
def server(pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "experiments.yaml").write_text(yaml.safe_dump([EXPERIMENT]))
    command = serve_command(*pairs("qwen2"), "--max-model-len", str(MAX_MODEL_LEN),
                            "--max-tokens-default", str(MAX_TOKENS_DEFAULT),
                            "--experiments", str(root / "experiments.yaml"),
                            "--db", f"sqlite:///{root / 'experiments.db'}", "--admin-key", ADMIN_KEY)
    proc = ServerProcess(command, root / "server.log", env={"EXPO_SERVE_API_KEY": API_KEY})
    yield proc
    assert proc.stop() in CLEAN_EXIT, proc.log()
    assert "Traceback" not in proc.log(), proc.log()[-4000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def post(http: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    """`body` as JSON (lone surrogates as \\u escapes), or raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body)
    return http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


def client_address(response: httpx.Response):
    return response.extensions["network_stream"].get_extra_info("client_addr")


def assert_refused_then_served(http: httpx.Client, response: httpx.Response, param: str | None,
                               code: str | None = None, status: int = 400) -> dict:
    """The envelope names `param`; then a normal request on the same connection succeeds."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    after = http.get("/v1/models")
    assert after.status_code == 200 and client_address(after) == client_address(response) is not None
    return error


def experiment(**changes) -> dict:
    return {**EXPERIMENT, "key": "other", "default": False, **changes}


# Every string field of every route, and keys of free-form objects; param None: a top-level key.
SURROGATES = [
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": BAD}]}, "messages[0].content"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": BAD}], "stream": True},
     "messages[0].content"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": BAD, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "hi", "name": BAD}]}, "messages[0].name"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", CHAT | {"model": BAD}, "model"),
    ("/v1/chat/completions", CHAT | {"user": BAD}, "user"),
    ("/v1/chat/completions", CHAT | {"experiment": BAD}, "experiment"),
    ("/v1/chat/completions", CHAT | {"stop": BAD}, "stop"),
    ("/v1/chat/completions", CHAT | {"stop": ["ok", BAD]}, "stop[1]"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": BAD}}, "response_format.type"),
    ("/v1/chat/completions", CHAT | {"tools": [{"function": {"name": BAD}}]}, "tools[0].function.name"),
    ("/v1/chat/completions", CHAT | {"logit_bias": {BAD: 1}}, "logit_bias"),
    ("/v1/chat/completions", CHAT | {"metadata": {"note": BAD}}, "metadata.note"),  # an unknown field too
    ("/v1/chat/completions", CHAT | {BAD: 1}, None),
    ("/v1/completions", {"prompt": BAD}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", BAD]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "hi", "suffix": BAD}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "model": BAD}, "model"),
    ("/v1/completions", {"prompt": "hi", "user": BAD}, "user"),
    ("/tokenize", {"prompt": BAD}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": BAD}]}, "messages[0].content"),
    ("/tokenize", {"prompt": "hi", "model": BAD}, "model"),
    ("/detokenize", {"tokens": [1], "model": BAD}, "model"),
    ("/v1/feedback", {"exposure_id": "exp_1", "name": "thumbs", "value": 1, "comment": BAD}, "comment"),
    ("/v1/feedback", {"exposure_id": BAD, "name": "thumbs", "value": 1}, "exposure_id"),
    ("/v1/feedback", {"exposure_id": "exp_1", "name": BAD, "value": 1}, "name"),
    ("/v1/experiments/ab/battles", {"messages": [{"role": "user", "content": BAD}]}, "messages[0].content"),
    ("/v1/experiments/ab/battles", {"messages": MESSAGES, "user": BAD}, "user"),
    ("/v1/battles/bat_1/vote", {"winner": BAD}, "winner"),
    ("/v1/experiments", experiment(key=BAD), "key"),
    ("/v1/experiments", experiment(description=BAD), "description"),
    ("/v1/experiments", experiment(arms=[{"name": BAD, "alpha": 0.0, "control": True}]), "arms[0].name"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES, ids=[f"{p} {f}" for p, _, f in SURROGATES])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(http, path, body, param):
    error = assert_refused_then_served(http, post(http, path, body, ADMIN), param, "invalid_utf8")
    assert "UTF-8" in error["message"] and "\\ud800" not in error["message"]


OUT_OF_RANGE = [
    ({"temperature": 1e308}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 129}, "n"), ({"seed": 2**64}, "seed"), ({"min_tokens": 10**9, "max_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [10**12]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"n": True}, "n"),
]


@pytest.mark.parametrize("patch,param", OUT_OF_RANGE, ids=[json.dumps(p)[:40] for p, _ in OUT_OF_RANGE])
def test_values_out_of_openai_and_vllm_bounds_are_400(http, patch, param):
    assert_refused_then_served(http, post(http, "/v1/chat/completions", CHAT | patch), param)


def test_values_at_the_bounds_are_served(http):
    body = CHAT | {"temperature": 2, "top_p": 1, "top_k": 0, "presence_penalty": -2, "frequency_penalty": 2,
                   "max_tokens": 3.0, "min_tokens": 3, "stop_token_ids": [0], "seed": 2**64 - 1, "alpha": 0.1}
    response = post(http, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3  # min_tokens == max_tokens; 3.0 is an integer
    # Tiny but positive: logits divided by them overflow, which must not make the draw fail.
    tiny = post(http, "/v1/chat/completions", CHAT | {"temperature": 5e-324, "repetition_penalty": 5e-324,
                                                      "top_p": 5e-324, "alpha": 0.1})
    assert tiny.status_code == 200, tiny.text


def test_max_tokens_default_caps_a_request_that_gives_none(http):
    chat = post(http, "/v1/chat/completions", {"messages": MESSAGES, "ignore_eos": True, "alpha": 0.0})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == MAX_TOKENS_DEFAULT
    asked = post(http, "/v1/chat/completions", {"messages": MESSAGES, "ignore_eos": True, "max_tokens": 9, "alpha": 0.0})
    assert asked.json()["usage"]["completion_tokens"] == 9  # the cap is a default, not a limit
    # Clipped to the room the context window leaves, so a long prompt is served, not refused.
    long_prompt = list(range(5, 5 + MAX_MODEL_LEN - 2))
    completion = post(http, "/v1/completions", {"prompt": long_prompt, "max_tokens": None, "ignore_eos": True,
                                                "alpha": 0.0})
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] == 2


def test_max_tokens_default_is_an_option_and_an_environment_variable(monkeypatch):
    assert ServerSettings(sft="s", delta="d").max_tokens_default == 1024
    monkeypatch.setenv("EXPO_SERVE_MAX_TOKENS_DEFAULT", "77")
    assert ServerSettings(sft="s", delta="d").max_tokens_default == 77
    args = build_parser().parse_args(["serve", "--sft", "s", "--delta", "d", "--max-tokens-default", "5"])
    assert settings_from_args(args).max_tokens_default == 5


def test_messages_say_what_is_wrong_in_the_callers_words(http):
    empty = assert_refused_then_served(http, post(http, "/v1/chat/completions", b""), None, "missing_body")
    assert "empty" in empty["message"] and "None" not in empty["message"]
    not_utf8 = assert_refused_then_served(http, post(http, "/v1/completions", b'{"prompt": "\xff"}'), None,
                                          "invalid_utf8")
    assert "UTF-8" in not_utf8["message"]
    not_an_object = assert_refused_then_served(http, post(http, "/tokenize", [1, 2]), None, "invalid_json")
    assert "JSON object" in not_an_object["message"]
    stops = assert_refused_then_served(http, post(http, "/v1/chat/completions", CHAT | {"stop": ["a"] * 10}), "stop")
    assert "at most 4" in stops["message"]
    comment = assert_refused_then_served(
        http, post(http, "/v1/feedback", {"exposure_id": "exp_1", "name": "thumbs", "value": 1, "comment": 5}), "comment")
    assert "string" in comment["message"] and "4000" not in comment["message"]
    part = assert_refused_then_served(http, post(http, "/v1/chat/completions", CHAT | {
        "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content[0]")
    assert "only text" in part["message"]
    # A client's string is echoed escaped and cut short.
    unknown = http.post("/v1/chat/completions", json=CHAT | {"model": "x" * 300 + "\n\x1b[31m"})
    error = assert_refused_then_served(http, unknown, "model", "model_not_found", status=404)
    assert len(error["message"]) < 200 and "\n" not in error["message"] and "\x1b" not in error["message"]


def test_both_keys_answer_401_with_the_same_type(server, http):
    no_key = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=30)
    wrong_admin = http.post("/v1/experiments", json=experiment(), headers={"X-Admin-Key": "wrong"})
    assert no_key.status_code == wrong_admin.status_code == 401
    assert no_key.json()["error"]["type"] == wrong_admin.json()["error"]["type"] == "invalid_request_error"


def test_options_names_every_method_of_the_path(http):
    response = http.options("/v1/experiments")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}
    assert http.put("/v1/chat/completions").headers["allow"] == "POST"


def test_openapi_states_the_rules_it_can(http):
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    token = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert token["minimum"] == 0 and token["maximum"] == 319  # the test pair's vocabulary
    chat = schemas["ChatCompletionRequest"]
    assert {"if": {"properties": {"top_logprobs": {"not": {"type": "null"}}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}} in chat["allOf"]
    assert chat["properties"]["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert [option["required"] for option in schemas["TokenizeRequest"]["oneOf"]] == [["prompt"], ["messages"]]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, method, statuses in [("/v1/experiments", "post", {"400", "401", "403"}),
                                   ("/v1/experiments/{key}/stop", "post", {"401", "403", "404"}),
                                   ("/v1/feedback", "post", {"400", "404"}),
                                   ("/v1/experiments/{key}/battles", "post", {"400", "404"}),
                                   ("/v1/battles/{battle_id}/vote", "post", {"400", "404"})]:
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses) and "422" not in responses, (path, responses)
        assert all(responses[s]["content"]["application/json"]["schema"] == error_ref for s in statuses)
        assert "requestBody" in spec["paths"][path][method] or path.endswith("/stop")


def test_an_unexpected_exception_is_a_500_envelope_and_the_connection_serves_on():
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(UnexpectedErrorMiddleware)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("injected")

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            failed = client.get("/boom")
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
            assert "injected" not in failed.text
            served = client.get("/ok")
            assert served.status_code == 200 and client_address(served) == client_address(failed)
    finally:
        server.should_exit = True
        thread.join(30)
