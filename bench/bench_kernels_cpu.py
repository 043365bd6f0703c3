"""The CPU torch path of expo_linear against a plain two-matmul implementation.

    python bench/bench_kernels_cpu.py [--reps 31] [--threads N]

Baseline: y = x·Wᵀ + (1+α)·(x·Δᵀ) with Δ already dense (decoded beforehand, so the baseline pays
nothing for the encoding). Shapes are SmolLM2-135M's linear layers (the model the engine serves on
CPU), float32. Decode batches (M <= 64) mix four α row by row; the prompt batch (M = 256) holds
four runs of α. The two are timed alternately, call after call, and compared by their medians,
since a second busy process on a 2-core machine distorts any single run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # run from a bare checkout too

import torch  # noqa: E402
from expo_kernels import LowRankDelta, encode_delta, expo_linear  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K, N): q/o, k/v, gate/up, down
ROWS = [1, 16, 64, 256]
ENCODINGS = ["dense", "int8", "int4", "bit", "lowrank"]
# The four α a batch mixes (the first four of tests/kernel_cases.py's ALPHAS): 0.3, SFT, aligned, 25.
ALPHAS = (0.3, -1.0, 0.0, 25.0)


def alpha_rows(m: int) -> torch.Tensor:
    if m <= 64:  # decode: four α row by row
        return torch.tensor([ALPHAS[i % 4] for i in range(m)], dtype=torch.float32)
    cuts = [0, int(0.35 * m), int(0.60 * m), int(0.82 * m), m]  # prompts: four runs
    return torch.cat([torch.full((cuts[i + 1] - cuts[i],), ALPHAS[i]) for i in range(4)])


def two_matmuls(x, w, delta_dense, alpha):
    return x @ w.T + (1.0 + alpha)[:, None] * (x @ delta_dense.T)


def timed_pair(a, b, reps: int) -> tuple[float, float]:
    """Median seconds of a() and b(), called alternately after a warm-up."""
    for _ in range(3):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started = time.time()
    lines, ratios = [], {}
    for k, n in SHAPES:
        w = torch.randn(n, k) / k**0.5
        delta = torch.randn(n, k) / k**0.5 * 0.05
        for encoding in ENCODINGS:
            if encoding == "lowrank":
                d = LowRankDelta(shape=(n, k), a=torch.randn(64, k) / k**0.5, b=torch.randn(n, 64) * 0.01)
            else:
                d = encode_delta(delta, encoding)
            dense = d.dequantize(torch.float32)
            for m in ROWS:
                x = torch.randn(m, k)
                alpha = alpha_rows(m)
                ours, base = timed_pair(lambda: expo_linear(x, w, d, alpha), lambda: two_matmuls(x, w, dense, alpha),
                                        args.reps)
                ratios.setdefault(m, []).append(ours / base)
                lines.append(f"{k:>5}->{n:<5} {m:>4} {encoding:8s} {ours * 1e6:10.1f} {base * 1e6:10.1f} {ours / base:6.2f}")
    load_after = os.getloadavg()
    print(f"CPU torch path vs two matmuls; float32, torch threads {args.threads}, median of {args.reps} alternated "
          f"calls; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {time.time() - started:.0f} s")
    print(f"{'K->N':11} {'M':>4} {'encoding':8s} {'ours us':>10} {'2-mm us':>10} {'ratio':>6}")
    print("\n".join(lines))
    print("geometric mean ratio by M: " + ", ".join(
        f"M={m}: {statistics.geometric_mean(r):.2f}" for m, r in ratios.items()))


if __name__ == "__main__":
    main()
