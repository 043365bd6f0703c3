"""Serving over HTTP vs. the engine in-process: the cost of HTTP, side by side in one run (issue 5).

Workload (fixed seed): N chat requests with prompts of 63–231 tokens and max_tokens of 16–128,
greedy, EOS ignored (every mode computes the same tokens), α drawn from three arms; C clients
each send their next request as soon as the previous one ends.

  (a) in-process: C asyncio tasks stream from AsyncEngine.generate (the chat template applied here)
  (b) HTTP: C clients stream `POST /v1/chat/completions` (SSE) from `expo-serve serve` on the
      same model and engine settings, started by this script on 127.0.0.1

Reported per mode (median over repeats): requests/s, output tokens/s, time to first token and
inter-token latency at p50 and p99 (as the client sees them: TTFT from sending the request to
the first text; ITL between successive pieces of text, per token). Warm-up excluded.

On a shared 2-core machine another process distorts a run badly, so each run also measures the
CPU time that processes other than this one and its server used meanwhile (from /proc), and runs
where that exceeds --max-foreign of the machine's capacity are discarded (and said so).

    python bench/bench_serving.py                        # the demo pair (prepared if needed)
    python bench/bench_serving.py --requests 8 --repeats 1   # a smoke run

`--compare` (issue 12) instead runs whole servers one at a time on the same workload, EOS honoured
(useful tokens/s = completion tokens the clients received / wall time), and reports each one's
peak RSS: the anchor `transformers serve --continuous-batching` on the merged checkpoint at α = 0.3,
expo-serve on that merged checkpoint, expo-serve with θ_sft + Δ (dense, int8, int4, bit) and α
per request over three arms, and with dense Δ over eight α values (a sweep).

    python bench/bench_serving.py --compare --repeats 2

`--budgets 2048,512,256` (issue 12) instead runs the engine in-process once per step budget
(`max_num_batched_tokens`), θ_sft + dense Δ, α over the three arms, the budgets' runs interleaved
round by round so the machine's drift cancels: time to first token against throughput.

    python bench/bench_serving.py --budgets 2048,1024,512,256 --repeats 3
"""
from __future__ import annotations

import argparse
import atexit
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from workload import ARMS, Request, make_workload  # noqa: E402


@dataclass
class Sample:
    """What one client saw of one request."""
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # per token
    tokens: int = 0


async def run_clients(requests: list[Request], concurrency: int, one) -> tuple[float, list[Sample]]:
    """C clients work through the requests; returns the wall time and every request's sample."""
    pending = list(reversed(requests))
    samples: list[Sample] = []

    async def client():
        while pending:
            samples.append(await one(pending.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, samples


# -- (a) the engine in-process ------------------------------------------------------------------------
def in_process(engine):
    from expo_serve.engine.request import SamplingParams

    async def one(r: Request) -> Sample:
        sample, sent = Sample(), time.perf_counter()
        last, seen = sent, 0
        params = SamplingParams(alpha=r.alpha, max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(r.prompt_ids, params):
            now, count = time.perf_counter(), len(out.outputs[0].token_ids)
            if count > seen:
                if seen == 0:
                    sample.ttft = now - sent
                else:
                    sample.gaps += [(now - last) / (count - seen)] * (count - seen)
                last, seen = now, count
        sample.tokens = seen
        return sample

    return one


# -- (b) over HTTP ------------------------------------------------------------------------------------
async def stream_chat(client, body: dict) -> Sample:
    """One streamed chat as the client sees it: time to the first text, gaps between pieces, and
    tokens (from the usage chunk; from the pieces, one a token, for a server that sends none)."""
    sample, sent, last, pieces = Sample(), time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                sample.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                pieces += 1
                if last is None:
                    sample.ttft = now - sent
                else:
                    sample.gaps.append(now - last)
                last = now
    sample.tokens = sample.tokens or pieces
    return sample


def over_http(client, model: str):
    async def one(r: Request) -> Sample:
        return await stream_chat(client, {"model": model, "messages": r.messages, "max_tokens": r.max_tokens,
                                          "temperature": 0, "ignore_eos": True, "alpha": r.alpha, "stream": True,
                                          "stream_options": {"include_usage": True}})

    return one


# -- whole servers side by side (--compare) ---------------------------------------------------------
SWEEP = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)


def chat_client(client, model: str, alphas: tuple[float, ...] | None):
    """One streamed chat as any OpenAI-compatible server takes it (greedy, EOS honoured); the α of
    request i is alphas[i % len(alphas)] (None: no `alpha` field)."""
    counter = iter(range(10**9))

    async def one(r: Request) -> Sample:
        body = {"model": model, "messages": r.messages, "max_tokens": r.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if alphas:
            body["alpha"] = alphas[next(counter) % len(alphas)]
        return await stream_chat(client, body)

    return one


async def measure_server(server, requests, args, alphas) -> list[dict]:
    import httpx

    runs = []
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=1200, limits=limits) as client:
        one = chat_client(client, server.model, alphas)
        await run_clients(requests[:4], 4, one)  # warm-up
        for _ in range(args.repeats):
            with ForeignCpu([os.getpid(), server.process.pid]) as foreign:
                wall, samples = await run_clients(requests, args.concurrency, one)
            runs.append(summarize(wall, samples, foreign.seconds))
            print(f"{server.name:<44} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), file=sys.stderr, flush=True)
    return runs


def compare_servers(args) -> None:
    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.merge import merge
    from expo_serve.delta.sources import open_source
    from expo_serve.delta.store import DeltaCheckpoint
    from expo_serve.demo.pair import load_preferences, prepare_demo_pair
    from servers import start_expo, start_transformers

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    requests = make_workload(AutoTokenizer.from_pretrained(pair.aligned_dir), args.requests, args.seed, corpus)
    work = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    deltas = {}
    for encoding in ("dense", "int8", "int4", "bit"):
        deltas[encoding] = work / encoding
        build_delta(sft, aligned, deltas[encoding], encoding=encoding)
    merged = work / "merged"
    merge(sft, DeltaCheckpoint(deltas["dense"]), 0.3, merged)
    expo_options = ["--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.max_model_len),
                    "--kv-cache-gib", str(args.kv_cache_gib)]
    plans = [("(a) transformers serve --continuous-batching, merged α=0.3", lambda log: start_transformers("a", merged, log), None),
             ("(b) expo-serve, merged α=0.3", lambda log: start_expo("b", ["--sft", str(merged), "--aligned", str(merged)], log, *expo_options), None)]
    for encoding, folder in deltas.items():
        plans.append((f"(c) expo-serve, {encoding} Δ, α over 3 arms",
                      lambda log, f=folder: start_expo("c", ["--sft", str(pair.sft_dir), "--delta", str(f)], log, *expo_options),
                      ARMS))
    plans.append(("(d) expo-serve, dense Δ, 8 α values",
                  lambda log: start_expo("d", ["--sft", str(pair.sft_dir), "--delta", str(deltas["dense"])], log, *expo_options),
                  SWEEP))
    if args.only:  # a subset of the servers, by label prefix, e.g. "(a),(c) expo-serve, dense"
        plans = [plan for plan in plans if any(plan[0].startswith(prefix.strip()) for prefix in args.only.split(","))]
    figures = {}
    for label, start, alphas in plans:
        server = start(work / f"{len(figures)}.log")
        server.name = label
        server.watch_memory()
        try:
            runs = asyncio.run(measure_server(server, requests, args, alphas))
        finally:
            server.stop()
        figures[label] = {**median_of(runs), "rss_gb": server.peak_rss / 1e9, "runs": len(runs)}
    if args.only:
        for label, f in figures.items():
            print(f"| {label} | {f['tok_s']:.1f} | {f['ttft_p50']:.2f} s | {f['ttft_p99']:.2f} s | {f['rss_gb']:.1f} GB |")
    else:
        report_comparison(figures, args, requests)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def compare_budgets(args) -> None:
    """The engine in-process at each step budget, rounds interleaved; TTFT against throughput."""
    import torch
    from transformers import AutoTokenizer

    from expo_serve.demo.pair import load_preferences, prepare_demo_pair
    from expo_serve.engine.async_engine import AsyncEngine
    from expo_serve.engine.llm_engine import EngineConfig, LLMEngine

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    requests = make_workload(AutoTokenizer.from_pretrained(pair.aligned_dir), args.requests, args.seed, corpus)
    budgets = [int(b) for b in args.budgets.split(",")]
    engines = {b: AsyncEngine(LLMEngine(EngineConfig(
        sft=str(pair.sft_dir), aligned=str(pair.aligned_dir), max_num_seqs=args.concurrency,
        max_model_len=args.max_model_len, kv_cache_bytes=int(args.kv_cache_gib * 2**30), max_num_batched_tokens=b)))
        for b in budgets}
    runs: dict[int, list[dict]] = {b: [] for b in budgets}

    async def rounds():
        for engine in engines.values():
            await run_clients(requests[:4], 4, in_process(engine))  # warm-up
        for attempt in range(args.max_attempts):
            if min(sum(r["foreign"] <= args.max_foreign for r in rs) for rs in runs.values()) >= args.repeats:
                break
            await wait_for_quiet([os.getpid()], args.max_foreign, args.patience_s)
            for budget, engine in engines.items():
                with ForeignCpu([os.getpid()]) as foreign:
                    wall, samples = await run_clients(requests, args.concurrency, in_process(engine))
                runs[budget].append(summarize(wall, samples, foreign.seconds))
                print(f"round {attempt + 1} budget {budget:<5} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[budget][-1].items()),
                      file=sys.stderr, flush=True)

    try:
        asyncio.run(rounds())
    finally:
        for engine in engines.values():
            engine.shutdown()
    figures = {b: median_of([r for r in rs if r["foreign"] <= args.max_foreign] or rs) for b, rs in runs.items()}
    first = figures[budgets[0]]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
             f"workload: {args.requests} chat requests, {args.concurrency} concurrent clients, θ_sft + dense Δ, "
             f"α ∈ {ARMS}, greedy, EOS ignored; median of the clean rounds (other processes ≤ {args.max_foreign:.0%} of the CPUs)",
             "", "| max_num_batched_tokens | tok/s | × first | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for budget, f in figures.items():
        lines.append(f"| {budget} | {f['tok_s']:.1f} | {f['tok_s'] / first['tok_s']:.2f} | {f['ttft_p50']:.2f} s | "
                     f"{f['ttft_p99']:.2f} s | {1000 * f['itl_p50']:.0f} ms | {1000 * f['itl_p99']:.0f} ms |")
    print("\n".join(lines))


def report_comparison(figures: dict, args, requests) -> None:
    import torch

    labels = list(figures)
    anchor, merged = figures[labels[0]], figures[labels[1]]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        f"workload: {args.requests} chat requests (prompts 63–231 tokens, max_tokens 16–128), {args.concurrency} "
        f"concurrent streaming clients, greedy, EOS honoured; median of {args.repeats} runs per server, one server at a time",
        "",
        "| server | useful tok/s | × (b) | × (a) | TTFT p50 | TTFT p99 | ITL p50 | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, f in figures.items():
        lines.append(f"| {label} | {f['tok_s']:.1f} | {f['tok_s'] / merged['tok_s']:.2f} | {f['tok_s'] / anchor['tok_s']:.2f} | "
                     f"{f['ttft_p50']:.2f} s | {f['ttft_p99']:.2f} s | {1000 * f['itl_p50']:.0f} ms | {f['rss_gb']:.1f} GB |")
    arms = [f for label, f in figures.items() if label.startswith("(c)")]
    sweep = next(f for label, f in figures.items() if label.startswith("(d)"))
    dense_arms = next(f for label, f in figures.items() if label.startswith("(c) expo-serve, dense"))
    goals = [
        ("per-request α over 3 arms ≥ 0.95× merged, every encoding", min(f["tok_s"] for f in arms) / merged["tok_s"], 0.95),
        ("8 α values ≥ 0.8× merged", sweep["tok_s"] / merged["tok_s"], 0.8),
        ("expo-serve merged ≥ 1.5× transformers serve", merged["tok_s"] / anchor["tok_s"], 1.5),
        ("per-request α over 3 arms (dense) ≥ 1.4× transformers serve", dense_arms["tok_s"] / anchor["tok_s"], 1.4),
        ("TTFT p50 ≤ 0.7× transformers serve's (3 arms, dense)", anchor["ttft_p50"] / max(dense_arms["ttft_p50"], 1e-9), 1 / 0.7),
        ("RSS ≤ 1/3 of transformers serve's (largest expo-serve)", anchor["rss_gb"] / max(f["rss_gb"] for f in list(figures.values())[1:]), 3.0),
    ]
    lines += ["", "| goal | measured | met |", "|---|---:|---|"]
    for name, value, bound in goals:
        lines.append(f"| {name} | {value:.2f} (needs ≥ {bound:.2f}) | {'yes' if value >= bound else 'NO'} |")
    print("\n".join(lines))


# -- other processes' CPU use ------------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def process_cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads (utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class ForeignCpu:
    """Measures the CPU time used by processes other than `pids` over a span of time."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def __enter__(self):
        self._busy, self._ours = busy_cpu_seconds(), sum(map(process_cpu_seconds, self.pids))
        return self

    def __exit__(self, *exc):
        self.seconds = (busy_cpu_seconds() - self._busy) - (sum(map(process_cpu_seconds, self.pids)) - self._ours)


# -- figures ----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(wall: float, samples: list[Sample], foreign_cpu_s: float) -> dict:
    ttfts = [s.ttft for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    return {"req_s": len(samples) / wall, "tok_s": sum(s.tokens for s in samples) / wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            "itl_p50": percentile(gaps, 0.5), "itl_p99": percentile(gaps, 0.99), "wall": wall,
            "foreign": max(0.0, foreign_cpu_s / (wall * (os.cpu_count() or 1)))}  # tick rounding can dip below 0


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def wait_for_quiet(pids: list[int], max_foreign: float, patience_s: float) -> float:
    """Wait (up to `patience_s`) for a 2-second window in which other processes use at most
    `max_foreign` of the CPUs; returns the share seen in the last window."""
    deadline = time.monotonic() + patience_s
    while True:
        with ForeignCpu(pids) as foreign:
            await asyncio.sleep(2.0)
        share = foreign.seconds / (2.0 * (os.cpu_count() or 1))
        if share <= max_foreign or time.monotonic() > deadline:
            return share
        await asyncio.sleep(8.0)


async def measure(args, requests, engine, url: str, server_pid: int) -> dict[str, list[dict]]:
    """Timed runs of both modes, back to back, until each has --repeats clean runs (or
    --max-attempts rounds have run); every run is kept with its foreign CPU share."""
    import httpx

    pids = [os.getpid(), server_pid]
    runs: dict[str, list[dict]] = {"in-process": [], "http": []}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        modes = {"in-process": in_process(engine), "http": over_http(client, "bench")}
        for one in modes.values():  # warm-up: a few requests through each path
            await run_clients(requests[:4], 4, one)
        for attempt in range(args.max_attempts):
            clean = min(sum(r["foreign"] <= args.max_foreign for r in mode_runs) for mode_runs in runs.values())
            if clean >= args.repeats:
                break
            await wait_for_quiet(pids, args.max_foreign, args.patience_s)
            for mode, one in modes.items():
                with ForeignCpu(pids) as foreign:
                    wall, samples = await run_clients(requests, args.concurrency, one)
                expected = sum(r.max_tokens for r in requests)
                assert sum(s.tokens for s in samples) == expected, (mode, sum(s.tokens for s in samples), expected)
                runs[mode].append(summarize(wall, samples, foreign.seconds))
                print(f"round {attempt + 1} {mode:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[mode][-1].items()),
                      file=sys.stderr, flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="clean timed runs wanted per mode; medians are reported")
    parser.add_argument("--max-attempts", type=int, default=10, help="rounds to run at most while waiting for clean ones")
    parser.add_argument("--patience-s", type=float, default=120.0,
                        help="how long to wait for a quiet machine before each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", help="SFT model folder (default: the demo pair)")
    parser.add_argument("--aligned", help="aligned model folder (default: the demo pair)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--max-foreign", type=float, default=0.05,
                        help="discard runs where other processes used more than this share of the CPUs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--compare", action="store_true",
                        help="whole servers one at a time: transformers serve and expo-serve (merged, Δ, sweep)")
    parser.add_argument("--only", help="with --compare: only the servers whose labels start with these comma-separated prefixes")
    parser.add_argument("--budgets", help="comma-separated step budgets (max_num_batched_tokens) to compare in-process")
    args = parser.parse_args()
    if args.compare:
        return compare_servers(args)
    if args.budgets:
        return compare_budgets(args)

    import torch
    from transformers import AutoTokenizer

    from expo_serve.demo.pair import load_preferences, prepare_demo_pair
    from expo_serve.engine.async_engine import AsyncEngine
    from expo_serve.engine.llm_engine import EngineConfig, LLMEngine

    if args.sft and args.aligned:
        sft, aligned = args.sft, args.aligned
    else:
        pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
        sft, aligned = str(pair.sft_dir), str(pair.aligned_dir)
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    requests = make_workload(AutoTokenizer.from_pretrained(aligned), args.requests, args.seed, corpus)

    config = EngineConfig(sft=sft, aligned=aligned, max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                          kv_cache_bytes=int(args.kv_cache_gib * 2**30))
    from servers import start_expo

    log = Path(tempfile.mkdtemp(prefix="bench-serving-")) / "server.log"
    server = start_expo("http", ["--sft", sft, "--aligned", aligned], log, "--max-num-seqs", str(args.concurrency),
                        "--max-model-len", str(args.max_model_len), "--kv-cache-gib", str(args.kv_cache_gib))
    engine = AsyncEngine(LLMEngine(config))
    try:
        runs = asyncio.run(measure(args, requests, engine, server.url, server.process.pid))
    finally:
        engine.shutdown()
        server.stop()

    clean = {mode: [r for r in mode_runs if r["foreign"] <= args.max_foreign] for mode, mode_runs in runs.items()}
    if not all(clean.values()):
        print(f"warning: every run of a mode had other processes using > {args.max_foreign:.0%} of the CPUs; "
              "reporting all runs", file=sys.stderr)
        clean = runs
    figures = {mode: median_of(r) for mode, r in clean.items()}
    a, b = figures["in-process"], figures["http"]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        f"workload: {args.requests} chat requests, {args.concurrency} concurrent clients, "
        f"{sum(r.max_tokens for r in requests)} output tokens, α ∈ {ARMS}, greedy; median of "
        f"{len(clean['in-process'])} and {len(clean['http'])} clean runs of {len(runs['http'])} "
        f"(other processes' CPU share in them ≤ {max(r['foreign'] for m in clean.values() for r in m):.1%})",
        "",
        "| mode | req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, f in (("(a) engine in-process", a), ("(b) HTTP + SSE, `expo-serve serve`", b)):
        lines.append(f"| {label} | {f['req_s']:.2f} | {f['tok_s']:.1f} | {f['ttft_p50']:.2f} s | {f['ttft_p99']:.2f} s | "
                     f"{1000 * f['itl_p50']:.0f} ms | {1000 * f['itl_p99']:.0f} ms |")
    lines.append(f"| (b) / (a) | {b['req_s'] / a['req_s']:.2f} | {b['tok_s'] / a['tok_s']:.2f} | "
                 f"{b['ttft_p50'] / a['ttft_p50']:.2f} | {b['ttft_p99'] / a['ttft_p99']:.2f} | "
                 f"{b['itl_p50'] / a['itl_p50']:.2f} | {b['itl_p99'] / a['itl_p99']:.2f} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": figures}, indent=2))


if __name__ == "__main__":
    main()
