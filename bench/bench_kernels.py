"""Kernel benchmark: expo_linear against cuBLAS on a merged W of the same shape.

    python bench/bench_kernels.py            # H100/H200, bf16: Mistral-7B shapes, M 1..2048, every encoding
    python bench/bench_kernels.py --cpu      # no GPU: tiny shapes through the Triton interpreter,
                                             # to check that the script runs (times mean nothing)

For every (shape, M, encoding): time (CUDA-graph replay, autotuning done first), ratio to F.linear
on W + (1+α)Δ merged, achieved GB/s over the bytes that must move (W, the encoded Δ, x, y), its
share of the measured copy bandwidth, the relative error against a float64 reference, and whether
the issue's speed goal holds. Decode batches mix α row by row; prefill batches hold 4 runs of α,
of unequal lengths that do not line up with tiles. The table comes last; --rows-out also appends
one JSON row per measurement as soon as it is taken (the GPU kit reads those, bench/gpu/). Batch
sizes run in the order given, every shape at each, so a run cut short keeps whole rows of M.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N): q/o, k/v, gate/up, down
ROWS = [1, 4, 16, 64, 256, 2048]
ENCODINGS = ["dense", "int8", "int4", "bit", "lowrank"]
# The four α a batch mixes (the first four of tests/kernel_cases.py's ALPHAS): 0.3, SFT, aligned, 25.
ALPHAS = (0.3, -1.0, 0.0, 25.0)
CPU_SHAPES = [(320, 192)]
CPU_ROWS = [3, 80]  # one decode batch, one prefill batch
# The goals for bf16 on an H100/H200 (issue 9): decode (M <= 16) ratio to the merged GEMM, and >= 70%
# of the measured copy bandwidth; prefill (M = 2048, <= 4 distinct α) ratio <= 1.3 for every encoding.
DECODE_RATIO_GOAL = {"dense": 2.1, "int8": 1.6, "int4": 1.35, "bit": 1.15, "lowrank": 1.1}
DECODE_SHARE_GOAL = 0.70
PREFILL_RATIO_GOAL = 1.3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="interpret the kernels on tiny CPU shapes")
    parser.add_argument("--encodings", nargs="+", default=ENCODINGS, choices=ENCODINGS)
    parser.add_argument("--rows", nargs="+", type=int, help="batch sizes M (default: the issue's)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shapes", nargs="+", help="K->N pairs as KxN (default: the Mistral-7B shapes)")
    parser.add_argument("--rows-out", help="append one JSON row per measurement to this file")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it decides at import
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # run from a bare checkout too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from expo_kernels import LowRankDelta, encode_delta, expo_linear  # noqa: E402


def alpha_rows(m: int, device) -> torch.Tensor:
    """Decode: four α row by row. Prefill: four runs of unequal lengths (35%, 25%, 22%, 18%)."""
    if m <= 64:
        values = [ALPHAS[i % 4] for i in range(m)]
    else:
        cuts = [0, int(0.35 * m), int(0.60 * m), int(0.82 * m), m]
        values = [ALPHAS[i] for i in range(4) for _ in range(cuts[i + 1] - cuts[i])]
    return torch.tensor(values, dtype=torch.float32, device=device)


def make_delta(encoding: str, delta: torch.Tensor, dtype) -> object:
    if encoding == "lowrank":  # random factors: the SVD's quality does not change the timing
        n, k = delta.shape
        g = torch.Generator(device=delta.device).manual_seed(1)
        a = torch.randn(ARGS.rank, k, generator=g, device=delta.device) / k**0.5
        b = torch.randn(n, ARGS.rank, generator=g, device=delta.device) * 0.01
        return LowRankDelta(shape=(n, k), a=a.to(dtype), b=b.to(dtype))
    return encode_delta(delta, encoding, group_size=ARGS.group_size).to(dtype=dtype)


class GpuClock:
    name = "cuda graph replay"

    def __init__(self):
        import triton.testing

        self._bench = triton.testing.do_bench_cudagraph

    def __call__(self, fn) -> float:
        fn()  # compile and autotune outside the capture
        torch.cuda.synchronize()
        return self._bench(fn, rep=20, return_mode="median") * 1e-3

    def copy_bandwidth(self) -> float:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return 2 * src.numel() / self(lambda: dst.copy_(src))


class CpuClock:
    name = "perf_counter, interpreted"

    def __call__(self, fn) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def copy_bandwidth(self) -> float:
        src = torch.empty(1 << 26, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return 2 * src.numel() / self(lambda: dst.copy_(src))


def reference(x, w, d, alpha) -> torch.Tensor:
    """float64 on the device (the bench's shapes are too large for a CPU reference)."""
    x64 = x.double()
    return x64 @ w.double().T + (1.0 + alpha.double())[:, None] * (x64 @ d.dequantize(torch.float64).to(x.device).T)


def goal(encoding: str, m: int, ratio: float, share: float) -> str:
    if ARGS.cpu:
        return ""
    if m <= 16:
        ok = ratio <= DECODE_RATIO_GOAL[encoding] and share >= DECODE_SHARE_GOAL
        return f"{'yes' if ok else 'NO '} (<= {DECODE_RATIO_GOAL[encoding]}x, >= {DECODE_SHARE_GOAL:.0%} BW)"
    if m == 2048:
        return f"{'yes' if ratio <= PREFILL_RATIO_GOAL else 'NO '} (<= {PREFILL_RATIO_GOAL}x)"
    return ""


def main() -> None:
    device = torch.device("cpu" if ARGS.cpu else "cuda")
    if not ARGS.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run with --cpu to check the script through the Triton interpreter")
    dtype = torch.float32 if ARGS.cpu else torch.bfloat16  # the interpreter's bf16 dot is emulated in fp32
    shapes = [tuple(int(v) for v in s.split("x")) for s in ARGS.shapes] if ARGS.shapes else (CPU_SHAPES if ARGS.cpu else SHAPES)
    rows = ARGS.rows or (CPU_ROWS if ARGS.cpu else ROWS)
    clock = CpuClock() if ARGS.cpu else GpuClock()
    started = time.time()
    copy_bw = clock.copy_bandwidth()
    name = "CPU (Triton interpreter: times are not performance)" if ARGS.cpu else torch.cuda.get_device_name()
    problems = {}  # (K, N) -> W, merged W, the encoded deltas: made once, timed at every M
    for k, n in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
        delta = torch.randn(n, k, generator=g, device=device) / k**0.5 * 0.05
        problems[k, n] = (w, (w.float() + 1.3 * delta).to(dtype), {e: make_delta(e, delta, dtype) for e in ARGS.encodings})
        del delta
    lines = []
    for m in rows:
        for (k, n), (w, merged, deltas) in problems.items():
            g = torch.Generator(device=device).manual_seed(m)
            x = torch.randn(m, k, generator=g, device=device).to(dtype)
            alpha = alpha_rows(m, device)
            t_merged = clock(lambda: F.linear(x, merged))
            for encoding, d in deltas.items():
                ref = reference(x, w, d, alpha)
                err = ((expo_linear(x, w, d, alpha).double() - ref).norm() / ref.norm()).item()
                del ref
                t = clock(lambda: expo_linear(x, w, d, alpha))
                moved = w.numel() * w.element_size() + d.nbytes + (x.numel() + m * n) * x.element_size()
                ratio, gbs = t / t_merged, moved / t / 1e9
                share = moved / t / copy_bw
                lines.append(f"{k:>5}->{n:<5} {m:>5} {encoding:8s} {t * 1e6:10.1f} {t_merged * 1e6:10.1f} "
                             f"{ratio:6.2f} {gbs:8.0f} {100 * share:5.0f}% {err:8.1e}  {goal(encoding, m, ratio, share)}")
                if ARGS.rows_out:
                    row = {"device": name, "dtype": str(dtype).removeprefix("torch."), "k": k, "n": n, "m": m,
                           "encoding": encoding, "us": t * 1e6, "merged_us": t_merged * 1e6, "ratio": ratio,
                           "gb_s": gbs, "share_of_bw": share, "copy_gb_s": copy_bw / 1e9, "rel_err": err,
                           "group_size": ARGS.group_size, "rank": ARGS.rank}
                    with open(ARGS.rows_out, "a") as out:
                        out.write(json.dumps(row) + "\n")
            print(f"done {k}->{n} M={m} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{name}, {dtype}, {clock.name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; "
          f"int4 group {ARGS.group_size}, lowrank rank {ARGS.rank}; {time.time() - started:.0f} s")
    print(f"{'K->N':11} {'M':>5} {'encoding':8s} {'us':>10} {'merged us':>10} {'ratio':>6} {'GB/s':>8} "
          f"{'of BW':>6} {'rel err':>8}  goal")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
