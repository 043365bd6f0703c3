"""Issue 6's scripted live run on the demo pair, in one command.

Starts `expo-serve demo` with a three-arm α experiment on a free loopback port, lets a simulated
population (bench/simulate.py: a true thumbs-up rate that peaks at α = 0.4) chat
with it through the official openai client and vote, then reads GET /v1/experiments/{key}/results
and GET /dashboard and prints a markdown summary for bench/RESULTS.md. Exit status 0 only when both
name the arm the population truly prefers.

    python bench/live_ab_demo.py [--requests 600] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPERIMENT = {"key": "alpha-sweep", "unit": "user", "allocation": "fixed", "primary_metric": "thumbs", "default": True,
              "min_sample": 40, "sequential_tuning_n": 150,
              "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a04", "alpha": 0.4},
                       {"name": "a15", "alpha": 1.5}]}
BANNER = re.compile(r"expo-serve: serving (\S+) at (http://\S+)")


def start_demo(work: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    (work / "experiments.yaml").write_text(yaml.safe_dump([EXPERIMENT]))
    command = [sys.executable, "-m", "expo_serve", "demo", "--port", "0", "--experiments", str(work / "experiments.yaml"),
               "--db", f"sqlite:///{work / 'experiments.db'}"]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 1800  # the first run prepares the demo pair
    while time.monotonic() < deadline:
        found = BANNER.search(log_path.read_text())
        if found:
            return process, found.group(2)
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the demo server did not start; its log:\n{log_path.read_text()[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from live_run import run  # bench/live_run.py, beside this script

    work = Path(tempfile.mkdtemp(prefix="live-ab-demo-"))
    process, url = start_demo(work, work / "server.log")
    try:
        started = time.perf_counter()
        summary = run(url, EXPERIMENT["key"], args.requests, args.users, args.concurrency, args.seed,
                      max_tokens=args.max_tokens)
        seconds = time.perf_counter() - started
        page = httpx.get(url + "/dashboard", params={"experiment": EXPERIMENT["key"]}, timeout=60).text
    finally:
        process.terminate()
        process.wait(60)

    winner = summary["decision"]["winner"]
    dashboard_names = bool(winner) and "Winner" in page and winner in page
    print(f"Demo pair ({summary['model']}), {time.strftime('%Y-%m-%d')}: {summary['requests']} chat requests "
          f"through the openai client ({args.concurrency} concurrent, max_tokens {args.max_tokens}, temperature 0.7), "
          f"{summary['votes']} thumbs votes, {seconds:.0f} s; SRM p = {summary['srm_p']:.3f}.\n")
    print("| arm | α | true thumbs-up rate | units | exposures | thumbs mean [95% CI] | P(best) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for arm in summary["arms"]:
        thumbs = arm["thumbs"] or {}
        lo, hi = thumbs.get("ci") or (float("nan"), float("nan"))
        print(f"| {arm['name']} | {arm['alpha']:g} | {summary['truth'][arm['name']]:.3f} | {arm['units']} | "
              f"{arm['exposures']} | {thumbs.get('mean', float('nan')):.3f} [{lo:.3f}, {hi:.3f}] | {arm['p_best']:.3f} |")
    print(f"\nThe population prefers **{summary['preferred']}**; the results route names **{winner}** "
          f"({summary['decision'].get('reason', '')}); the dashboard names it: {'yes' if dashboard_names else 'NO'}.")
    if summary["errors"]:
        print("errors:", *summary["errors"][:10], sep="\n  ")
        return 1
    return 0 if winner == summary["preferred"] and dashboard_names else 1


if __name__ == "__main__":
    sys.exit(main())
