"""Tensor parallelism: engine tokens/s at N ranks side by side in one run, and the time rank 0
spends per step in communication (issue 13). A benchmark, never a timed test.

Workload (fixed seed, bench/workload.py): chat requests with prompts of 63–231 tokens, max_tokens
16–128, greedy, EOS ignored, α per request drawn from three arms; all submitted at once, at most
--concurrency running. Useful tokens/s = tokens asked for / wall time; warm-up excluded; the
median of --repeats runs. Per step, rank 0's time in collectives (all-reduces, the logits gather:
synchronous with gloo on a CPU, so that is the communication time, including any wait for a rank
that arrives later) and in sending the step's inputs to the workers; and each rank's bytes of
θ_sft + Δ.

    python bench/bench_tp.py                          # the demo pair (prepared if needed), N = 1,2,3
    python bench/bench_tp.py --random smollm2-even    # the demo's shape with 8 heads and 2 kv heads
    python bench/bench_tp.py --random tiny --quick    # a smoke run on a tiny random pair

The demo pair (SmolLM2-135M) has 9 attention heads and 3 key/value heads: N = 2 cannot split it
and is refused with the engine's own sentence, which the table shows; N = 3 can, and N = 2 runs on
`--random smollm2-even`, a random pair of the demo's shape with 8 and 2 heads. On the 2-core dev
machine, N ranks share 2 cores: the figures bound what communication and the Python step cost,
not what N GPUs gain. Run it with nothing else on the machine (DESIGN.md §7).
"""
from __future__ import annotations

import argparse
import atexit
import os
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


# The demo pair's shape (SmolLM2-135M: 30 layers, hidden 576, MLP 1536, vocabulary 49152) with 8
# attention heads of 72 and 2 key/value heads instead of 9 and 3, so that N = 2 splits it.
EVEN_SHAPES = {"smollm2-even": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                                    num_key_value_heads=2, head_dim=72, vocab_size=49152, tie_word_embeddings=True)}


def measure(size: int, sft: Path, delta: Path, requests, args) -> dict:
    """One engine at `size` ranks: its useful tokens/s over the timed runs and its per-step costs."""
    from expo_serve import LLM, SamplingParams
    from expo_serve.model.parallel import held_bytes

    params = [SamplingParams(alpha=r.alpha, max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in requests]
    prompts = [r.prompt_ids for r in requests]
    started = time.perf_counter()
    with LLM(str(sft), delta=str(delta), tensor_parallel_size=size, max_num_seqs=args.concurrency,
             max_model_len=1024) as llm:
        setup_s = time.perf_counter() - started
        threads = torch.get_num_threads()  # rank 0's; a CPU rank takes its share of the cores
        engine = llm.engine
        steps = [0]
        step = engine.step

        def counted():
            steps[0] += 1
            return step()

        engine.step = counted
        send = _timed_send(engine)
        llm.generate(prompts[:2], params[:2])  # warm-up
        tp = engine.loaded.model.tp
        times, comm, sent, counts = [], [], [], []
        for _ in range(args.repeats):
            steps[0], send["seconds"] = 0, 0.0
            comm_before = tp.comm_seconds if tp else 0.0
            begin = time.perf_counter()
            outs = llm.generate(prompts, params)
            times.append(time.perf_counter() - begin)
            assert [len(o.token_ids) for o in outs] == [r.max_tokens for r in requests]
            comm.append((tp.comm_seconds - comm_before) if tp else 0.0)
            sent.append(send["seconds"])
            counts.append(steps[0])
        rank_bytes = engine.workers.rank_bytes if engine.workers else [held_bytes(engine.loaded.model)]
    useful = sum(r.max_tokens for r in requests)
    median = statistics.median(times)
    i = times.index(median) if median in times else 0
    return dict(size=size, tok_s=useful / median, runs=times, steps=counts[i], comm_ms=1e3 * comm[i] / counts[i],
                send_ms=1e3 * sent[i] / counts[i], step_ms=1e3 * times[i] / counts[i], rank_bytes=rank_bytes, setup_s=setup_s,
                threads=threads)


def _timed_send(engine) -> dict:
    """Time rank 0's sends of step inputs to the workers (none with one rank)."""
    totals = {"seconds": 0.0}
    workers = engine.workers
    if workers is None:
        return totals
    send = workers.send

    def timed(message: bytes) -> None:
        begin = time.perf_counter()
        send(message)
        totals["seconds"] += time.perf_counter() - begin

    workers.send = timed
    return totals


def pair_and_tokenizer(args, work: Path):
    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.sources import open_source

    if args.random:
        sys.path.insert(0, str(ROOT / "bench" / "gpu"))
        from random_pair import RandomSource, make_config, make_pair, save_folder

        if args.random in EVEN_SHAPES:
            config = make_config("tiny")
            config.update(EVEN_SHAPES[args.random])
            sft_source = RandomSource(config, seed=0, device="cpu", dtype=torch.float32)
            aligned_source = RandomSource(config, seed=1, device="cpu", dtype=torch.float32, base=sft_source)
        else:
            sft_source, aligned_source = make_pair(args.random, "cpu", torch.float32)
        sft_dir, aligned_dir = save_folder(sft_source, work / "sft"), save_folder(aligned_source, work / "aligned")
        label = f"random {args.random} pair"
    else:
        from expo_serve.demo.pair import prepare_demo_pair

        from expo_serve.demo.run import demo_delta

        pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
        sft_dir, aligned_dir = pair.sft_dir, pair.aligned_dir
        label = "demo pair (SmolLM2-135M)"
        if args.encoding == "dense":  # the demo's own delta, cached
            return sft_dir, demo_delta(pair), AutoTokenizer.from_pretrained(aligned_dir), label
    delta = work / args.encoding
    build_delta(open_source(sft_dir), open_source(aligned_dir), delta, encoding=args.encoding, dtype="float32")
    return sft_dir, delta, AutoTokenizer.from_pretrained(aligned_dir), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2,3", help="tensor_parallel_size values, comma-separated")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size; the median is reported")
    parser.add_argument("--encoding", default="dense", choices=("dense", "int8", "int4", "bit", "lowrank"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", choices=("tiny", "mistral-7b", *EVEN_SHAPES),
                        help="a random pair of this shape instead of the demo pair (smollm2-even: the demo's shape, "
                             "with heads that N = 2 splits)")
    parser.add_argument("--quick", action="store_true", help="4 requests of at most 16 tokens, one run (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats = 4, 1

    from expo_serve.demo.pair import load_preferences
    from expo_serve.errors import ExpoError

    work = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    sft, delta, tokenizer, label = pair_and_tokenizer(args, work)
    corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
    requests = make_workload(tokenizer, args.requests, args.seed, corpus)
    if args.quick:
        for r in requests:
            r.max_tokens = min(r.max_tokens, 16)
    rows, refused = [], {}
    for size in (int(s) for s in args.sizes.split(",")):
        try:
            row = measure(size, sft, delta, requests, args)
        except ExpoError as exc:
            refused[size] = str(exc)
            print(f"N={size}: refused: {exc}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"N={size}: {row['tok_s']:.1f} tok/s, {row['steps']} steps, {row['step_ms']:.1f} ms/step, comm "
              f"{row['comm_ms']:.2f} ms/step, send {row['send_ms']:.2f} ms/step (runs: "
              f"{', '.join(f'{t:.1f}s' for t in row['runs'])}; set-up {row['setup_s']:.0f} s)", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["size"] == 1), None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{label}, Δ {args.encoding}; {args.requests} requests, {args.concurrency} concurrent, "
          f"{sum(r.max_tokens for r in requests)} useful tokens, arms α ∈ {ARMS}, median of {args.repeats}")
    print()
    print("| N | threads a rank | useful tok/s | × N=1 | ms/step | comm ms/step | send ms/step | θ_sft + Δ per rank (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "–"
        print(f"| {r['size']} | {r['threads']} | {r['tok_s']:.1f} | {ratio} | {r['step_ms']:.1f} | {r['comm_ms']:.2f} | {r['send_ms']:.2f} | "
              f"{', '.join(f'{b / 2**20:.1f}' for b in r['rank_bytes'])} |")
    for size, reason in refused.items():
        print(f"| {size} | | refused: {reason} | | | | | |")


if __name__ == "__main__":
    main()
