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
"""
from __future__ import annotations

import argparse
import json
import platform
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--quick", action="store_true", help="one repeat, no HF baseline (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

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

    results = {}
    if not args.quick:
        results["a_hf_merged"] = timed("(a) HF generate, merged", lambda: run_hf(merged, requests, args.concurrency))
    results["b_engine_merged"] = timed("(b) engine, merged", lambda: run_engine(requests, args.concurrency, False, sft=str(merged)))
    for encoding, folder in deltas.items():
        results[f"c_{encoding}"] = timed(f"(c) engine, per-request α, {encoding}",
                                         lambda f=folder: run_engine(requests, args.concurrency, True, sft=str(pair.sft_dir), delta=str(f)))

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
