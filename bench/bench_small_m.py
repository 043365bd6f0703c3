"""Small-M products on the CPU: what the decode GEMMs reach, and whether prepacked weights help (issue 12).

For each linear layer shape of the demo model (SmolLM2-135M: hidden 576, MLP 1536, 49,152-token
vocabulary) and each row count M, times in one run, side by side:

  F.linear          x·Wᵀ as the engine's torch path runs it today (MKL sgemm, which packs W on every call)
  mkl packed        the same product on W packed once ahead of time for MKL (torch.ops.mkl._mkl_linear,
                    what inductor's CPU backend uses for fp32 linears), with its largest difference
                    from F.linear
  fused (2 prod.)   x·Wᵀ + ((1+α)x)·Δᵀ as the torch path runs it (two products, α per row)

and reports µs per call (median of --repeats timed loops), GFLOPS, and packed / F.linear. Float32,
the threads torch uses by default. By default the weights stream from memory as in a decode step
(each call takes the next of enough copies of W and Δ to overflow the caches: a step runs every
layer's weights once); `--hot` reuses one W, which then sits in the caches. The cores' peak is not read from the machine: compare GFLOPS
with the figure the CPU's vendor gives (AVX2 FMA: 32 float32 FLOPs per cycle per core).

    python bench/bench_small_m.py                 # the demo shapes, M in 1 4 16 64
    python bench/bench_small_m.py --rows 16 --repeats 5
    python bench/bench_small_m.py --hot               # the weights in the caches
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, N out, K in) of one SmolLM2-135M decoder layer's products and the lm_head.
SHAPES = (("qkv_proj", 960, 576), ("o_proj", 576, 576), ("gate_up_proj", 3072, 576), ("down_proj", 576, 1536),
          ("lm_head", 49152, 576))


STREAM_BYTES = 256 * 2**20  # copies of W (and Δ) per shape: far past any L3 cache


def per_call_us(fn, min_s: float = 0.2) -> float:
    """One estimate: µs per call over a loop of at least min_s seconds (after one untimed call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hot", action="store_true", help="reuse one W (cache-resident) instead of streaming copies")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, "
          f"weights {'cache-resident' if args.hot else 'streamed from memory'}")
    print("| layer | M | F.linear µs | GFLOPS | mkl packed µs | GFLOPS | packed / F.linear | max |Δy| | fused 2-product µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, k in SHAPES:
        copies = 1 if args.hot else max(2, STREAM_BYTES // (n * k * 4))
        weights = [torch.randn(n, k) * k ** -0.5 for _ in range(copies)]
        deltas = [torch.randn(n, k) * 0.01 * k ** -0.5 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k)
            alpha = torch.rand(m)
            packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
            turn = iter(range(1 << 62))

            def next_index() -> int:
                return next(turn) % copies

            def plain_call():
                F.linear(x, weights[next_index()])

            def packed_call():
                i = next_index()
                torch.ops.mkl._mkl_linear(x, packed[i], weights[i], None, m)

            def fused_call():
                i = next_index()
                F.linear(torch.addcmul(x, x, alpha[:, None]), deltas[i], F.linear(x, weights[i]))

            plain = [per_call_us(plain_call) for _ in range(args.repeats)]
            fast = [per_call_us(packed_call) for _ in range(args.repeats)]
            fused = [per_call_us(fused_call) for _ in range(args.repeats)]
            diff = (torch.ops.mkl._mkl_linear(x, packed[0], weights[0], None, m) - F.linear(x, weights[0])).abs().max()
            flops = 2.0 * m * n * k
            p, f, u = statistics.median(plain), statistics.median(fast), statistics.median(fused)
            print(f"| {name} {n}x{k} | {m} | {p:.0f} | {flops / p / 1e3:.1f} | {f:.0f} | {flops / f / 1e3:.1f} | "
                  f"{f / p:.2f} | {diff.item():.1e} | {u:.0f} |", flush=True)

if __name__ == "__main__":
    main()
