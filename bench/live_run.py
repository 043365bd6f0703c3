"""A scripted live run: simulated users chat with a running expo-serve through the official
`openai` client, vote on the answers, and the results route must name the arm they truly prefer.

    python bench/live_run.py --base-url http://127.0.0.1:8000 --experiment alpha-sweep

The server must run the experiment (e.g. `expo-serve demo --experiments FILE`); each chat passes
`experiment` (extra_body) and `user`, reads the response's `expo` object, and votes through
POST /v1/feedback with the population's true, α-dependent preference (simulate.py). Exit status 0
when the named winner is the arm the population prefers, 2 when no winner is named yet, 1 when a
different arm is named.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or imported from tests/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate import Population, population_mean  # noqa: E402  (bench/simulate.py)

PROMPTS = ["Give me one tip for writing clear emails.", "What is a good name for a grey cat?",
           "Explain what a hash function is in one sentence.", "Suggest a quick vegetarian dinner.",
           "Why is the sky blue? Answer briefly.", "Write a haiku about autumn."]


def run(base_url: str, experiment: str, requests: int, users: int, concurrency: int, seed: int,
        api_key: str | None = None, max_tokens: int = 24, model: str | None = None) -> dict:
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "not-needed", max_retries=2)
    model = model or client.models.list().data[0].id
    population = Population(users=users, seed=seed)
    lock = threading.Lock()
    http = httpx.Client(base_url=base_url, timeout=60,
                        headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    served, votes, errors = [], 0, []

    def one(i: int) -> None:
        nonlocal votes
        rng = population.request_rng(i)  # per request: the data do not depend on thread timing
        user = population.visitor(rng)
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
            temperature=0.7, user=f"user-{user}", extra_body={"experiment": experiment})
        expo = (response.model_extra or {}).get("expo")
        if not expo or not expo.get("exposure_id"):
            errors.append(f"request {i}: no expo.exposure_id in the response")
            return
        served.append(expo)
        vote = population.vote(user, expo["alpha"], rng)
        if vote is not None:
            r = http.post("/v1/feedback", json={"exposure_id": expo["exposure_id"], "name": "thumbs", "value": vote})
            if r.status_code != 200:
                errors.append(f"feedback {i}: HTTP {r.status_code} {r.text[:200]}")
                return
            with lock:
                votes += 1

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(one, i) for i in range(requests)]:
            future.result()
    results = http.get(f"/v1/experiments/{experiment}/results").json()
    http.close()
    truth = {arm["name"]: population_mean(arm["alpha"], population.taste_sd) for arm in results["arms"]}
    preferred = max(truth, key=truth.get)
    return {"requests": len(served), "votes": votes, "errors": errors, "model": model,
            "truth": {k: round(v, 4) for k, v in truth.items()}, "preferred": preferred,
            "decision": results["decision"], "srm_p": results["srm_p"],
            "arms": [{"name": a["name"], "alpha": a["alpha"], "units": a["units"], "exposures": a["exposures"],
                      "p_best": a["p_best"], "thumbs": a["metrics"].get("thumbs")} for a in results["arms"]]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/live_run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--experiment", default="alpha-sweep")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    summary = run(args.base_url, args.experiment, args.requests, args.users, args.concurrency, args.seed,
                  args.api_key, args.max_tokens, args.model)
    print(json.dumps(summary, indent=2))
    winner = summary["decision"]["winner"]
    if summary["errors"]:
        return 1
    if winner is None:
        return 2
    return 0 if winner == summary["preferred"] else 1


if __name__ == "__main__":
    sys.exit(main())
