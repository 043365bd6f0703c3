"""With --api-key nothing is readable without it: every route of the app (the experiments' and
the dashboard's too) but the open ones is 401 without the key and served with it; the dashboard
takes the key once through its sign-in form and keeps a token in an HttpOnly, SameSite=Strict
cookie; /metrics is open unless --metrics-require-key; a large body without the key is refused
before it is read."""
from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from expo_serve.experiments import ExperimentService, open_store
from expo_serve.experiments.config import parse_experiment
from expo_serve.server.app import create_app
from expo_serve.server.middleware import COOKIE, LOGIN_PATH, OPEN, is_open
from expo_serve.server.experiments_wiring import mount_experiments
from expo_serve.server.settings import ServerSettings
from server_process import ServerProcess, serve_command

KEY = "s3cret-key"
ADMIN = "admin-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
EXPERIMENT = {"key": "sweep", "arms": [{"name": "control", "alpha": 0.0, "control": True},
                                       {"name": "a05", "alpha": 0.5}]}
MESSAGES = [{"role": "user", "content": "Paris is the capital of"}]


def _server_app(engine, db_path, **options):
    """The app as `expo-serve serve` builds it: the experiments' routes and dashboard mounted."""
    settings = ServerSettings(sft="unused", aligned="unused", model_name="tiny", api_key=KEY, admin_key=ADMIN,
                              **options)
    service = ExperimentService(open_store(f"sqlite:///{db_path}"), [parse_experiment(EXPERIMENT)])
    app = create_app(settings, engine, experiments=service)
    mount_experiments(app, service, settings)
    return app


def app_routes(router) -> list[tuple[str, str]]:
    """(method, path) of every route, including those of included routers."""
    found = []
    for route in router.routes:
        if hasattr(route, "original_router"):
            found += app_routes(route.original_router)
        elif hasattr(route, "path"):
            found += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    app = _server_app(engine, tmp_path_factory.mktemp("security") / "experiments.db")
    with TestClient(app, follow_redirects=False) as client:
        yield client


def test_every_route_but_the_open_ones_needs_the_key(client):
    routes = app_routes(client.app)
    paths = {path for _, path in routes}
    # The routes this test must see (a sanity check on the walk over the app's routers).
    for path in ("/v1/chat/completions", "/tokenize", "/detokenize", "/dashboard", "/dashboard/panel",
                 "/v1/experiments/{key}/results", "/v1/feedback", "/health", "/metrics", "/openapi.json"):
        assert path in paths, path
    refused = []
    for method, path in routes:
        concrete = path.replace("{key}", "sweep").replace("{name}", "dashboard.css").replace("{", "").replace("}", "")
        reply = client.request(method, concrete)
        if is_open(concrete):
            assert reply.status_code != 401, (method, path)
        else:
            assert reply.status_code == 401, (method, path, reply.status_code)
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"] == "Bearer"
            refused.append(path)
    assert {"/dashboard", "/dashboard/panel", "/tokenize", "/detokenize", "/v1/experiments",
            "/v1/experiments/{key}", "/v1/experiments/{key}/results"} <= set(refused)
    # Closed by default: a path no route serves is a 401 too, not a 404 that maps the server.
    assert client.get("/no/such/path").status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/dashboard/static/dashboard.css").status_code == 200


def test_with_the_key_the_reads_are_served(client):
    assert client.post("/v1/experiments/sweep/start", headers=BEARER | {"X-Admin-Key": ADMIN}).status_code == 200
    replies = {
        "dashboard": client.get("/dashboard", headers=BEARER),
        "panel": client.get("/dashboard/panel", params={"key": "sweep"}, headers=BEARER),
        "tokenize": client.post("/tokenize", json={"prompt": "Hello world"}, headers=BEARER),
        "detokenize": client.post("/detokenize", json={"tokens": [1, 2, 3]}, headers=BEARER),
        "experiments": client.get("/v1/experiments", headers=BEARER),
        "results": client.get("/v1/experiments/sweep/results", headers=BEARER),
        "models": client.get("/v1/models", headers=BEARER),
    }
    for name, reply in replies.items():
        assert reply.status_code == 200, (name, reply.text)
    assert 'data-key="sweep"' in replies["panel"].text and "sweep" in replies["dashboard"].text
    assert replies["tokenize"].json()["count"] > 0


def test_the_dashboard_takes_the_key_once_and_keeps_it_in_a_strict_cookie(client):
    # A browser without the key gets a page that says how to authenticate, with the sign-in form.
    page = client.get("/dashboard", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert f'action="{LOGIN_PATH}"' in page.text and "Authorization: Bearer" in page.text
    assert LOGIN_PATH in client.get("/dashboard/panel").json()["error"]["message"]  # the script's fetch
    assert client.get(LOGIN_PATH).status_code == 200

    wrong = client.post(LOGIN_PATH, data={"api_key": "guess"})
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies
    signed_in = client.post(LOGIN_PATH, data={"api_key": KEY})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = signed_in.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/dashboard"
    token = signed_in.cookies[COOKIE]
    assert KEY not in token  # a token derived from the key, not the key
    client.cookies.clear()  # the test client keeps cookies: from here on each request says which it sends

    jar = {COOKIE: token}
    assert client.get("/dashboard", cookies=jar).status_code == 200
    assert client.get("/dashboard/panel", params={"key": "sweep"}, cookies=jar).status_code == 200
    # The cookie opens the dashboard only: not the API, where another site's form could use it.
    assert client.get("/v1/experiments", cookies=jar).status_code == 401
    assert client.post("/tokenize", json={"prompt": "hi"}, cookies=jar).status_code == 401
    assert client.get("/dashboard", cookies={COOKIE: "forged"}).status_code == 401
    # A sign-in form larger than a key is refused without reading it all.
    assert client.post(LOGIN_PATH, content=b"api_key=" + b"x" * 10_000,
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413


def test_metrics_can_be_closed(engine, tmp_path):
    app = _server_app(engine, tmp_path / "experiments.db", metrics_require_key=True)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=BEARER).status_code == 200
        assert client.get("/health").status_code == 200
    assert is_open("/metrics") and not is_open("/metrics", metrics_require_key=True)
    assert "/health" in OPEN and "/metrics" in OPEN


def test_a_large_body_without_the_key_is_refused_before_it_is_read(pairs, tmp_path):
    """5 MB to /tokenize (7 s of tokenizing when it was open): refused in under 50 ms."""
    sft, aligned = pairs("qwen2")
    proc = ServerProcess(serve_command(sft, aligned, "--metrics-require-key", "true", "--log-level", "warning"),
                         tmp_path / "server.log", env={"EXPO_SERVE_API_KEY": KEY})
    try:
        body = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            assert client.post("/tokenize", json={"prompt": "warm up"}, headers=BEARER).status_code == 200
            assert client.get("/metrics").status_code == 401  # the flag, from the command line
            assert client.get("/health").status_code == 200
            timings = []
            for _ in range(3):
                with httpx.Client(base_url=proc.url, timeout=60) as fresh:
                    fresh.get("/health")  # connected, so that only the request is measured
                    start = time.perf_counter()
                    reply = fresh.post("/tokenize", content=body, headers=headers)
                    timings.append(time.perf_counter() - start)
                assert reply.status_code == 401, reply.text
                assert reply.json()["error"]["code"] == "invalid_api_key"
            assert min(timings) < 0.050, timings  # the best of three: the CPU is shared with the server
            # The server is unharmed and serves the next request.
            assert client.post("/tokenize", json={"prompt": "after"}, headers=BEARER).status_code == 200
    finally:
        assert proc.stop() == 0, proc.log()



def test_the_readme_says_for_every_route_whether_it_needs_a_key(client):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    security = readme[readme.index("Security:"):]
    security = security[:security.index("\n\n", security.index("| Route |"))]
    spans = {re.sub(r"\{[^}]*\}", "{}", span) for span in re.findall(r"`([^`]+)`", security)}
    for method, path in app_routes(client.app):
        path = re.sub(r"\{[^}]*\}", "{}", path)
        assert f"{method} {path}" in spans or path in spans, (method, path)
    for path in OPEN:
        assert path.rstrip("/") in security, path
