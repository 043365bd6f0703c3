"""Engine throughput, side by side in one run (issue 4; DESIGN.md §7).

Workload (fixed seed): N chat requests with prompts of 63–231 tokens and max_tokens of 16–128,
greedy, EOS ignored so every configuration computes the same tokens; α drawn from three arms.

  (a) Hugging Face `generate` on the merged checkpoint, static batches of --concurrency
      (left-padded; a batch runs until its longest request is done)
  (b) the engine on the merged checkpoint (no Δ), --concurrency sequences at a time
  (c) the engine with θ_sft + Δ and α per request, for each delta encoding

Useful tokens/s = tokens the requests asked for / wall time. Warm-up runs are excluded.

    python bench/bench_engine.py                       # the demo pair (prepared if needed)
    python bench/bench_engine.py --requests 8 --quick  # a smoke run

GPU mode (issue 9), on a random pair of a real shape made on the device (bench/gpu/random_pair.py):

    python bench/bench_engine.py --random mistral-7b --device cuda --dtype bfloat16 --rows-out rows.jsonl
    python bench/bench_engine.py --random tiny --device cpu --dtype float32      # the same steps, tiny

For the merged model (a plain checkpoint: every Δ zero) and θ_sft + Δ in each encoding, with CUDA
graphs on (and, for merged and bit, off): batch-1 decode tokens/s and the GB/s of weights it
reads (W + encoded Δ of every linear layer, per token), and throughput with --concurrent requests
at once, α mixed over three arms. One JSON row per configuration goes to --rows-out as soon as
it is measured, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from workload import ARMS, make_workload  # noqa: E402

ENCODINGS = ("dense", "int8", "int4", "bit", "lowrank")


def run_hf(model_dir: Path, requests, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch_run(batch):
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch), do_sample=False,
                           eos_token_id=None, pad_token_id=pad)

    batch_run(requests[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch_run(requests[i:i + batch_size])
    return time.perf_counter() - start


def run_engine(requests, concurrency: int, per_request_alpha: bool, **llm_args) -> float:
    from expo_serve import LLM, SamplingParams

    llm = LLM(max_num_seqs=concurrency, max_model_len=1024, **llm_args)

    def params(r):
        return SamplingParams(alpha=r.alpha if per_request_alpha else None, max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)

    llm.generate([r.prompt_ids for r in requests[:2]], [params(r) for r in requests[:2]])  # warm-up
    start = time.perf_counter()
    outs = llm.generate([r.prompt_ids for r in requests], [params(r) for r in requests])
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == [r.max_tokens for r in requests]
    return elapsed


# -- GPU mode: a random pair of a real shape ------------------------------------------------------------
RANDOM_CONFIGS = [  # (Δ encoding or "merged", CUDA graphs): the goals' rows first, so a cut run keeps them
    ("merged", True), ("bit", True), ("int4", True), ("lowrank", True), ("int8", True), ("dense", True),
    ("merged", False), ("bit", False),
]


def bytes_per_decode_token(model) -> int:
    """Bytes every decode step must read: W, bias and encoded Δ of every linear layer (lm_head
    included; the embedding reads one row, and norms are noise)."""
    from expo_serve.model.layers import ExpoLinear

    total = 0
    for module in model.modules():
        if isinstance(module, ExpoLinear):
            total += module.weight.numel() * module.weight.element_size() + module.delta.nbytes
            total += 0 if module.bias is None else 2 * module.bias.numel() * module.bias.element_size()
    return total


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the practical ceiling)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_random_config(sft, aligned, encoding: str, graphs: bool, args, requests) -> dict:
    """Load one configuration, then time batch-1 decode and the concurrent workload."""
    from expo_serve import SamplingParams
    from expo_serve.engine.llm_engine import EngineConfig, LLMEngine
    from expo_serve.model.loader import load_model

    device = torch.device(args.device)
    started = time.perf_counter()
    if encoding == "merged":
        loaded = load_model(sft, dtype=args.dtype, device=device)
    else:
        loaded = load_model(sft, aligned=aligned, aligned_encoding=encoding, dtype=args.dtype, device=device)
    sync(device)
    load_s = time.perf_counter() - started
    config = EngineConfig(sft=sft.spec, dtype=args.dtype, device=args.device, max_num_seqs=args.concurrent,
                          max_model_len=args.max_model_len, kv_cache_bytes=int(args.kv_cache_gib * 2**30),
                          enforce_eager=not graphs)
    engine = LLMEngine(config, loaded=loaded)
    setup_s = time.perf_counter() - started
    per_request_alpha = encoding != "merged"

    def run(batch: list, alphas: list, max_tokens: int):
        ids = [engine.add_request(list(p), SamplingParams(alpha=a if per_request_alpha else None, max_tokens=max_tokens,
                                                           temperature=0.0, ignore_eos=True))
               for p, a in zip(batch, alphas)]
        start = time.perf_counter()
        done = engine.run_to_completion(ids)
        sync(device)
        return time.perf_counter() - start, [done[i] for i in ids]

    with torch.inference_mode():
        run(requests[:2], [0.3, 1.0], 4)  # warm-up: compiles and autotunes outside the timings
        _, (one,) = run(requests[:1], [0.3], args.decode_tokens)
        m = one.metrics
        decode_tok_s = (args.decode_tokens - 1) / (m.finished_time - m.first_token_time)
        run(requests[:args.concurrent], [ARMS[i % 3] for i in range(args.concurrent)], 4)  # warm the large buckets
        wall, outs = run(requests[:args.concurrent], [ARMS[i % 3] for i in range(args.concurrent)], args.max_tokens)
    assert all(len(o.token_ids) == args.max_tokens for o in outs)
    moved = bytes_per_decode_token(loaded.model)
    row = {"config": encoding, "cuda_graphs": graphs and device.type == "cuda", "load_s": round(load_s, 2),
           "setup_s": round(setup_s, 2), "decode_tok_s": decode_tok_s, "decode_bytes_per_token": moved,
           "decode_gb_s": moved * decode_tok_s / 1e9, "concurrent": args.concurrent,
           "concurrent_tok_s": args.concurrent * args.max_tokens / wall}
    del engine, loaded, outs, one
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main_random(args) -> None:
    import random

    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from random_pair import make_pair

    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    sft, aligned = make_pair(args.random, device, dtype)
    vocab = sft.config.vocab_size
    rng = random.Random(args.seed)
    requests = [[rng.randrange(4, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.concurrent)]
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{name}; {args.random} random pair, {args.dtype}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    wanted = set(args.encodings.split(",")) | {"merged"}
    rows = []
    for encoding, graphs in RANDOM_CONFIGS:
        if encoding not in wanted or (not graphs and device.type != "cuda"):
            continue  # CUDA graphs exist only on CUDA: off is the only mode elsewhere
        row = measure_random_config(sft, aligned, encoding, graphs, args, requests)
        row.update(device=name, shape=args.random, dtype=args.dtype, copy_gb_s=bandwidth / 1e9,
                   decode_share_of_bw=row["decode_gb_s"] * 1e9 / bandwidth)
        rows.append(row)
        print(f"{encoding:8s} graphs {'on ' if row['cuda_graphs'] else 'off'}  batch-1 {row['decode_tok_s']:8.1f} tok/s "
              f"{row['decode_gb_s']:7.0f} GB/s  {args.concurrent} concurrent {row['concurrent_tok_s']:9.1f} tok/s  "
              f"(set-up {row['setup_s']:.0f} s)", file=sys.stderr, flush=True)
        if args.rows_out:
            with open(args.rows_out, "a") as out:
                out.write(json.dumps(row) + "\n")
    merged = {r["cuda_graphs"]: r for r in rows if r["config"] == "merged"}
    print(f"| Δ | CUDA graphs | batch-1 tok/s | GB/s | of BW | × merged | {args.concurrent} concurrent tok/s | × merged |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = merged.get(r["cuda_graphs"])
        ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "–"  # noqa: E731
        print(f"| {r['config']} | {'on' if r['cuda_graphs'] else 'off'} | {r['decode_tok_s']:.1f} | {r['decode_gb_s']:.0f} | "
              f"{100 * r['decode_share_of_bw']:.0f}% | {ratio('decode_tok_s')} | {r['concurrent_tok_s']:.0f} | "
              f"{ratio('concurrent_tok_s')} |")


def alpha_cache_ab(rounds: int, requests, concurrency: int, useful: int, merged: Path, sft: Path, delta: Path) -> None:
    """Round after round, back to back: the merged checkpoint, per-request α with the α cache at its
    default, and per-request α without it; the ratios are taken within each round, so the machine's
    drift between rounds cancels."""
    arms = {"merged": lambda: run_engine(requests, concurrency, False, sft=str(merged)),
            "alpha cache on (default)": lambda: run_engine(requests, concurrency, True, sft=str(sft), delta=str(delta)),
            "alpha cache off": lambda: run_engine(requests, concurrency, True, sft=str(sft), delta=str(delta),
                                                  alpha_cache_bytes=0)}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(rounds):
        for name, run in arms.items():
            rates[name].append(useful / run())
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {r[-1]:.1f} tok/s" for name, r in rates.items()),
              file=sys.stderr)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; {rounds} rounds, {delta.name} Δ")
    print("\n| configuration | median tok/s | × merged, per round (median) | rounds |\n|---|---:|---:|---|")
    for name, values in rates.items():
        per_round = [v / m for v, m in zip(values, rates["merged"])]
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(per_round):.2f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--alpha-cache-ab", type=int, default=0, metavar="ROUNDS",
                        help="instead: ROUNDS rounds of merged / α cache on / α cache off, back to back, with the "
                             "first of --encodings")
    parser.add_argument("--quick", action="store_true", help="one repeat, no HF baseline (a smoke run)")
    parser.add_argument("--alpha-cache-gib", type=float, help="the engine's α cache (default: the engine's own default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    random_mode = parser.add_argument_group("GPU mode: a random pair of a real shape")
    random_mode.add_argument("--random", choices=("mistral-7b", "tiny"), help="run on a random pair of this shape")
    random_mode.add_argument("--device", default="cuda")
    random_mode.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    random_mode.add_argument("--concurrent", type=int, default=64, help="requests at once in the throughput run")
    random_mode.add_argument("--prompt-tokens", type=int, default=128)
    random_mode.add_argument("--max-tokens", type=int, default=128, help="tokens per request in the throughput run")
    random_mode.add_argument("--decode-tokens", type=int, default=128, help="tokens of the batch-1 decode run")
    random_mode.add_argument("--max-model-len", type=int, default=1024)
    random_mode.add_argument("--kv-cache-gib", type=float, default=4.0)
    random_mode.add_argument("--rows-out", type=Path, help="append one JSON row per configuration here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.random:
        return main_random(args)

    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.merge import merge
    from expo_serve.delta.sources import open_source
    from expo_serve.delta.store import DeltaCheckpoint
    from expo_serve.demo.pair import load_preferences, prepare_demo_pair

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    tokenizer = AutoTokenizer.from_pretrained(pair.aligned_dir)
    requests = make_workload(tokenizer, args.requests, args.seed, corpus)
    useful = sum(r.max_tokens for r in requests)
    repeats = 1 if args.quick else args.repeats

    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    deltas = {}
    for encoding in args.encodings.split(","):
        deltas[encoding] = work / encoding
        build_delta(sft, aligned, deltas[encoding], encoding=encoding, dtype="float32")
    merged = work / "merged"
    merge(sft, DeltaCheckpoint(deltas.get("dense") or next(iter(deltas.values()))), 0.3, merged)

    def timed(label, fn):
        times = [fn() for _ in range(repeats)]
        rate = useful / statistics.median(times)
        print(f"{label:<36} {rate:8.1f} tok/s  (runs: {', '.join(f'{t:.1f}s' for t in times)})", file=sys.stderr)
        return rate

    if args.alpha_cache_ab:
        alpha_cache_ab(args.alpha_cache_ab, requests, args.concurrency, useful, merged, pair.sft_dir,
                       deltas[args.encodings.split(",")[0]])
        return
    results = {}
    if not args.quick:
        results["a_hf_merged"] = timed("(a) HF generate, merged", lambda: run_hf(merged, requests, args.concurrency))
    cache = {} if args.alpha_cache_gib is None else {"alpha_cache_bytes": int(args.alpha_cache_gib * 2**30)}
    results["b_engine_merged"] = timed("(b) engine, merged", lambda: run_engine(requests, args.concurrency, False, sft=str(merged)))
    for encoding, folder in deltas.items():
        results[f"c_{encoding}"] = timed(f"(c) engine, per-request α, {encoding}",
                                         lambda f=folder: run_engine(requests, args.concurrency, True, sft=str(pair.sft_dir),
                                                                     delta=str(f), **cache))

    b = results["b_engine_merged"]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}",
        f"workload: {args.requests} requests, {args.concurrency} concurrent, {useful} useful tokens, arms α ∈ {ARMS}, "
        f"median of {repeats}",
        "",
        "| configuration | useful tok/s | ratio |",
        "|---|---:|---:|",
    ]
    if "a_hf_merged" in results:
        lines.append(f"| (a) HF generate, merged checkpoint | {results['a_hf_merged']:.1f} | 1.00 × (a) |")
        lines.append(f"| (b) engine, merged checkpoint | {b:.1f} | {b / results['a_hf_merged']:.2f} × (a) |")
    else:
        lines.append(f"| (b) engine, merged checkpoint | {b:.1f} | 1.00 × (b) |")
    for encoding in deltas:
        c = results[f"c_{encoding}"]
        lines.append(f"| (c) engine, per-request α, {encoding} Δ | {c:.1f} | {c / b:.2f} × (b) |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
