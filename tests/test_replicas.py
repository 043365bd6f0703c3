"""Replicas: two real `expo-serve serve` processes on one PostgreSQL, behind a real nginx that runs
deploy/nginx.conf (rendered by deploy/render_nginx.py, as docs/deploy.md tells an operator to).

Through the load balancer: 200 users × 3 requests each keep one arm (the salted hash's arm) while
their requests spread over both replicas; the results read on either replica count all 600
exposures and every feedback; 20 concurrent edits of one experiment through both replicas all
succeed (or get a clear 409), and the phases they start are numbered 1, 2, … without a gap.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from experiments_helpers import free_port, postgres_bin, shared_postgres
from server_process import ServerProcess, serve_command

from expo_serve.experiments.assign import choose_arm
from expo_serve.experiments.config import parse_experiment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
from render_nginx import render  # noqa: E402  (deploy/render_nginx.py)

ADMIN = "admin-secret"
KEY = "replicas"
EXPERIMENT = {"key": KEY, "unit": "user", "allocation": "fixed", "primary_metric": "thumbs", "seed": "salt-2026",
              "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a03", "alpha": 0.3},
                       {"name": "a10", "alpha": 1.0}]}
USERS, ROUNDS = 200, 3
REQUESTS = "expo:e2e_request_latency_seconds_count"  # one per generation request a replica served


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


class Nginx:
    """nginx in the foreground with a main file of its own (pid, logs and temporary files in a
    temporary folder) that includes the rendered site file, the part an operator deploys. The main
    file adds one header naming the replica that answered, so the test can see the spread."""

    def __init__(self, replicas: list[str]):
        self.root = Path(tempfile.mkdtemp(prefix="expo-nginx-"))
        self.root.chmod(0o755)  # as root, nginx's workers run as an unprivileged user
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.root / "expo-serve.conf").write_text(render(f"127.0.0.1:{self.port}", replicas))
        r = self.root
        (r / "nginx.conf").write_text(f"""daemon off;
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {r}/body; proxy_temp_path {r}/proxy; fastcgi_temp_path {r}/fastcgi;
    uwsgi_temp_path {r}/uwsgi; scgi_temp_path {r}/scgi;
    access_log {r}/access.log;
    add_header X-Test-Upstream $upstream_addr always;
    include {r}/expo-serve.conf;
}}
""")
        command = [nginx_binary(), "-p", str(r), "-e", str(r / "error.log"), "-c", str(r / "nginx.conf")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx refused the rendered config: {check.stderr}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"nginx exited: {self.error_log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"nginx did not answer within {timeout} s: {self.error_log()}"
            time.sleep(0.05)

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(pairs, tmp_path_factory):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it on CI)")
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    sft, aligned = pairs("qwen2")
    root = tmp_path_factory.mktemp("replicas")
    (root / "experiments.yaml").write_text(yaml.safe_dump([EXPERIMENT]))
    db = shared_postgres().new_database()
    command = serve_command(sft, aligned, "--experiments", str(root / "experiments.yaml"), "--db", db,
                            "--admin-key", ADMIN, "--max-tokens-default", "4")
    with ThreadPoolExecutor(2) as pool:  # both start at once, as a deployment's replicas do
        starting = [pool.submit(ServerProcess, command, root / f"replica{i}.log") for i in range(2)]
        replicas = [future.result() for future in starting]
    balancer = None
    try:
        balancer = Nginx([r.url.removeprefix("http://") for r in replicas])
        balancer.wait_ready()
        yield balancer, replicas
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll until `condition()` holds; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def served_by(response: httpx.Response) -> str:
    # $upstream_addr lists every replica tried; the last one answered.
    return response.headers["x-test-upstream"].split(",")[-1].strip()


async def _traffic(url: str, model: str) -> list[dict]:
    """USERS × ROUNDS chats through the load balancer, then a thumbs vote on every exposure."""
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(16)

        async def chat(user: int, turn: int) -> dict:
            body = {"model": model, "messages": [{"role": "user", "content": f"hello {turn}"}], "max_tokens": 2,
                    "user": f"user-{user}", "experiment": KEY}
            async with gate:
                response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            expo = response.json()["expo"]
            return {"user": f"user-{user}", "arm": expo["arm"], "exposure_id": expo["exposure_id"],
                    "replica": served_by(response)}

        served = []
        for turn in range(ROUNDS):  # round by round, so one user's requests are apart in time
            served += await asyncio.gather(*[chat(user, turn) for user in range(USERS)])

        async def vote(i: int, exposure: dict) -> str:
            exposure["thumbs"] = (i * 7) % 3 == 0
            async with gate:
                response = await client.post("/v1/feedback", json={"exposure_id": exposure["exposure_id"],
                                                                    "name": "thumbs", "value": exposure["thumbs"]})
            assert response.status_code == 200, response.text
            return served_by(response)

        voted_on = await asyncio.gather(*[vote(i, exposure) for i, exposure in enumerate(served)])
    for exposure, replica in zip(served, voted_on):
        exposure["vote_replica"] = replica
    return served


def test_users_keep_one_arm_across_replicas_and_results_count_every_replica(deployment):
    balancer, replicas = deployment
    requests_before = [replica.metrics().get(REQUESTS, 0) for replica in replicas]
    served = asyncio.run(_traffic(balancer.url, replicas[0].model))
    addresses = {r.url.removeprefix("http://") for r in replicas}
    assert len(served) == USERS * ROUNDS and len({e["exposure_id"] for e in served}) == USERS * ROUNDS

    # The requests really went to both replicas, and each replica's own counters agree.
    per_replica = Counter(e["replica"] for e in served)
    assert set(per_replica) == addresses and min(per_replica.values()) >= USERS * ROUNDS // 4, per_replica
    assert set(Counter(e["vote_replica"] for e in served)) == addresses
    for replica, before in zip(replicas, requests_before):  # counted as a request ends, maybe after its answer
        wait_for(lambda: replica.metrics().get(REQUESTS, 0) - before == per_replica[replica.url.removeprefix("http://")],
                 f"{replica.url}'s request count")

    # One arm per user, on whichever replica served each request: the salted hash's arm.
    experiment = parse_experiment(EXPERIMENT)
    names = [arm.name for arm in experiment.arms]
    arms_of, replicas_of = defaultdict(set), defaultdict(set)
    for e in served:
        arms_of[e["user"]].add(e["arm"])
        replicas_of[e["user"]].add(e["replica"])
    assert all(len(arms) == 1 for arms in arms_of.values())
    on_both = [user for user, where in replicas_of.items() if len(where) == 2]
    assert len(on_both) >= USERS // 4, f"only {len(on_both)} users were served by both replicas"
    for user, (arm,) in arms_of.items():
        assert arm == choose_arm(f"{experiment.seed}:1", user, names, experiment.fixed_weights())
    assert set(Counter(next(iter(a)) for a in arms_of.values())) == set(names)

    # Results on either replica: every exposure and every vote, wherever it was recorded.
    exposures = Counter(e["arm"] for e in served)
    units = Counter(next(iter(arms)) for arms in arms_of.values())
    votes, ups = exposures, Counter(e["arm"] for e in served if e["thumbs"])  # one vote per exposure
    for replica in replicas:
        response = httpx.get(replica.url + f"/v1/experiments/{KEY}/results", timeout=60)
        assert response.status_code == 200, response.text
        results = response.json()
        assert results["phase"] == 1
        arms = {a["name"]: a for a in results["arms"]}
        assert sum(a["exposures"] for a in arms.values()) == USERS * ROUNDS
        for name in names:
            thumbs = arms[name]["metrics"]["thumbs"]
            assert (arms[name]["exposures"], arms[name]["units"]) == (exposures[name], units[name]), name
            assert thumbs["n"] == votes[name] and thumbs["units"] == units[name], (name, thumbs)
            assert thumbs["mean"] == pytest.approx(ups[name] / votes[name], abs=1e-6)


def _edit(i: int) -> dict:
    """An edit that changes who gets which arm (a new α for one arm), so each one starts a phase."""
    arms = [dict(arm) for arm in EXPERIMENT["arms"]]
    arms[2]["alpha"] = round(1.5 + 0.05 * i, 2)
    return {**EXPERIMENT, "arms": arms}


async def _concurrent_edits(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"X-Admin-Key": ADMIN}) as client:
        return await asyncio.gather(*[client.post("/v1/experiments", json=_edit(i)) for i in range(n)])


def test_concurrent_edits_through_both_replicas_never_fail_and_number_phases_without_gaps(deployment):
    balancer, replicas = deployment
    before = httpx.get(replicas[0].url + f"/v1/experiments/{KEY}/results", timeout=60).json()["phase"]
    responses = asyncio.run(_concurrent_edits(balancer.url, 20))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 409}, {r.status_code: r.text for r in responses}
    for conflict in (r for r in responses if r.status_code == 409):
        assert conflict.json()["error"]["code"] == "edit_conflict"
    assert {served_by(r) for r in responses} == {r.url.removeprefix("http://") for r in replicas}
    accepted = [r.json() for r in responses if r.status_code == 200]
    assert accepted, statuses
    final = before + len(accepted)  # every accepted edit changed an arm's α: one new phase each
    assert sorted(view["phase"] for view in accepted) == list(range(before + 1, final + 1))

    alphas = {round(1.5 + 0.05 * i, 2) for i in range(20)}
    for replica in replicas:
        # The results route reads the stored state: the same phase on both replicas at once.
        results = httpx.get(replica.url + f"/v1/experiments/{KEY}/results", timeout=60).json()
        assert results["phase"] == final and results["status"] == "running"
        assert {a["name"]: a["alpha"] for a in results["arms"]}["a10"] in alphas
        for phase in range(1, final):
            old = httpx.get(replica.url + f"/v1/experiments/{KEY}/results", params={"phase": phase}, timeout=60)
            assert old.status_code == 200 and old.json()["status"] == "ended", (phase, old.text)
    # Each replica's own copy catches up at its next refresh (a bound for a failure, not a sleep).
    for replica in replicas:
        wait_for(lambda: httpx.get(replica.url + f"/v1/experiments/{KEY}", timeout=30).json()["phase"] == final,
                 f"{replica.url}'s copy of the experiment at phase {final}")
    # New traffic through the balancer joins the new phase, at the hash's arm for it.
    current = parse_experiment({**EXPERIMENT, "arms": [{"name": a["name"], "alpha": a["alpha"],
                                                        "control": a["control"]} for a in results["arms"]]})
    chat = httpx.post(balancer.url + "/v1/chat/completions", timeout=60, json={
        "model": replicas[0].model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "user": "late-user", "experiment": KEY})
    assert chat.status_code == 200, chat.text
    expected = choose_arm(f"{current.seed}:{final}", "late-user", [a.name for a in current.arms],
                          current.fixed_weights())
    assert chat.json()["expo"]["arm"] == expected


def test_the_deploy_guide_shows_the_config_the_test_runs():
    guide = (ROOT / "docs" / "deploy.md").read_text()
    begin, end = "<!-- deploy/nginx.conf: begin -->\n```nginx\n", "```\n<!-- deploy/nginx.conf: end -->"
    assert begin in guide and end in guide, "docs/deploy.md must quote deploy/nginx.conf between its markers"
    shown = guide[guide.index(begin) + len(begin): guide.index(end)]
    assert shown == (ROOT / "deploy" / "nginx.conf").read_text()
    with pytest.raises(ValueError):
        render("8000", ["not-an-address"])
