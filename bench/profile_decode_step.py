"""Where one decode step's time goes on this machine (issue 12): a profile, side by side in one run.

Sixteen sequences of the demo pair (prompts of 63–231 tokens from the benchmarks' workload) are
prefilled, then decode steps of all sixteen rows are timed and one is profiled with torch.profiler,
for each configuration:

  merged       the merged checkpoint at α = 0.3 (no Δ): what a plain model costs
  one α        θ_sft + dense Δ, every row at α = 0.3: the α cache serves the step (one product per layer)
  3 arms       θ_sft + dense Δ, α over {0, 0.3, 1}: the fused path (x·Wᵀ + (1+α)·x·Δᵀ)
  3 arms, int8 θ_sft + int8 Δ over the same arms (decoded to float32 once, as the CPU path keeps it)

`--compile` adds the same 3-arm configuration with every decoder layer's MLP and norms compiled by
torch.compile (inductor's CPU backend, dynamic shapes), the part of the step that compiles without
graph breaks (attention reads the paged KV cache through Python lists).

Reported per configuration: milliseconds per decode step (median of --steps), and the profiled
step's time by kind of work: products (aten::mm/addmm/linear), attention (SDPA and the KV gather),
elementwise and the rest of the aten ops, and what no aten op accounts for (Python, dispatch).

    python bench/profile_decode_step.py              # about two minutes
    python bench/profile_decode_step.py --compile
"""
from __future__ import annotations

import argparse
import atexit
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

PRODUCTS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm")
ATTENTION = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::index_select", "aten::index", "aten::index_put_", "aten::_unsafe_index_put")


def prefilled_engine(requests, alphas, **llm_args):
    """An engine whose 16 sequences have all been prefilled: every following step is 16 decode rows."""
    from expo_serve import LLM, SamplingParams

    llm = LLM(max_num_seqs=len(requests), max_model_len=1024, **llm_args)
    engine = llm.engine
    for r, alpha in zip(requests, alphas):
        engine.add_request(r.prompt_ids, SamplingParams(alpha=alpha, max_tokens=512, temperature=0.0, ignore_eos=True))
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in [*engine.scheduler.waiting, *engine.scheduler.running]):
        engine.step()
    return engine


def compile_layers(engine) -> None:
    for layer in engine.runner.model.model.layers:
        layer.mlp = torch.compile(layer.mlp, dynamic=True)
        layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=True)
        layer.post_attention_layernorm = torch.compile(layer.post_attention_layernorm, dynamic=True)


def measure(engine, steps: int) -> dict:
    for _ in range(3):  # warm-up (and torch.compile's first calls)
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
    kinds = {"products": 0.0, "attention": 0.0, "other aten": 0.0}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = "products" if event.key in PRODUCTS else "attention" if event.key in ATTENTION else "other aten"
        kinds[kind] += event.self_cpu_time_total / 1e6
    kinds["outside aten"] = max(0.0, wall - sum(kinds.values()))
    return {"step_ms": 1000 * statistics.median(times), "profiled_s": wall, **kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also the 3-arm step with torch.compile'd MLPs and norms")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.merge import merge
    from expo_serve.delta.sources import open_source
    from expo_serve.delta.store import DeltaCheckpoint
    from expo_serve.demo.pair import load_preferences, prepare_demo_pair

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    requests = make_workload(AutoTokenizer.from_pretrained(pair.aligned_dir), args.seqs, 0, corpus)
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    for encoding in ("dense", "int8"):
        build_delta(sft, aligned, work / encoding, encoding=encoding, dtype="float32")
    merge(sft, DeltaCheckpoint(work / "dense"), 0.3, work / "merged")
    arms = [ARMS[i % len(ARMS)] for i in range(args.seqs)]
    plans = {
        "merged checkpoint": lambda: prefilled_engine(requests, [None] * args.seqs, sft=str(work / "merged")),
        "dense Δ, one α (α cache)": lambda: prefilled_engine(requests, [0.3] * args.seqs, sft=str(pair.sft_dir),
                                                             delta=str(work / "dense")),
        "dense Δ, 3 arms (fused)": lambda: prefilled_engine(requests, arms, sft=str(pair.sft_dir), delta=str(work / "dense")),
        "int8 Δ, 3 arms (fused)": lambda: prefilled_engine(requests, arms, sft=str(pair.sft_dir), delta=str(work / "int8")),
    }
    figures = {}
    for label, make in plans.items():
        engine = make()
        figures[label] = measure(engine, args.steps)
        print(f"{label:<34} {figures[label]['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)
        if args.compile and label.startswith("dense Δ, 3 arms"):
            compile_layers(engine)
            start = time.perf_counter()
            engine.step()
            print(f"torch.compile: first step {time.perf_counter() - start:.0f} s", file=sys.stderr)
            figures[label + ", torch.compile"] = measure(engine, args.steps)
        del engine

    base = figures["merged checkpoint"]["step_ms"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; {args.seqs} decode rows, demo pair (SmolLM2-135M, float32)")
    print("\n| decode step | ms/step | × merged | products | attention | other aten ops | outside aten (Python, dispatch) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, f in figures.items():
        share = lambda key: f"{1000 * f[key]:.0f} ms ({100 * f[key] / f['profiled_s']:.0f}%)"  # noqa: E731
        print(f"| {label} | {f['step_ms']:.0f} | {f['step_ms'] / base:.2f} | {share('products')} | {share('attention')} | "
              f"{share('other aten')} | {share('outside aten')} |")


if __name__ == "__main__":
    main()
