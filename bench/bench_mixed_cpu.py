"""CPU time of the `mixed` encoding's torch path against `lowrank` at the same stored bytes.

    python bench/bench_mixed_cpu.py [--bits 1.0] [--reps 31]

Δ is the demo pair's real one (layer 0 of SmolLM2-135M: q, k, gate, down), so the bands the encoder
picks follow a real spectrum. For each matrix: `mixed` at --bits, and a bf16 `lowrank` whose rank
gives the same stored bytes (2·r·(N+K) ≈ the mixed bytes). Both run expo_linear's torch path in
float32 on the same x and α rows (four α mixed row by row), timed alternately; medians compared.
Also printed: how much of ‖Δ‖² each keeps, since equal bytes buy the mixed bands a higher rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

import torch  # noqa: E402
from bench_kernels_cpu import ALPHAS, alpha_rows, timed_pair  # noqa: E402
from expo_kernels import encode_delta, expo_linear  # noqa: E402

MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]
ROWS = [1, 16, 64, 256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=31)
    args = parser.parse_args()
    from expo_serve.delta.sources import open_source
    from expo_serve.demo.pair import prepare_demo_pair

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    torch.manual_seed(0)
    load_before, started = os.getloadavg(), time.time()
    lines, ratios = [], {}
    for module in MATRICES:
        name = f"model.layers.0.{module}.weight"
        w = sft.get(name).float()
        delta = aligned.get(name).float() - w
        n, k = delta.shape
        mixed = encode_delta(delta, "mixed", bits=args.bits)
        rank = max(1, round(mixed.nbytes / (2 * (n + k))))
        lowrank = encode_delta(delta, "lowrank", rank=rank, dtype=torch.bfloat16)
        kept = {label: 1 - float((delta - d.dequantize()).norm() ** 2 / delta.norm() ** 2)
                for label, d in (("mixed", mixed), ("lowrank", lowrank))}
        for m in ROWS:
            x, alpha = torch.randn(m, k), alpha_rows(m)
            t_mixed, t_low = timed_pair(lambda: expo_linear(x, w, mixed, alpha), lambda: expo_linear(x, w, lowrank, alpha),
                                        args.reps)
            ratios.setdefault(m, []).append(t_mixed / t_low)
            lines.append(f"{module:17s} {k:>5}->{n:<5} {m:>4} {mixed.nbytes / 1024:8.1f} {lowrank.nbytes / 1024:8.1f} "
                         f"{rank:>5} {kept['mixed']:7.3f} {kept['lowrank']:7.3f} {t_mixed * 1e6:9.1f} {t_low * 1e6:9.1f} "
                         f"{t_mixed / t_low:6.2f}")
    load_after = os.getloadavg()
    print(f"mixed (--bits {args.bits:g}) vs bf16 lowrank at the same bytes, torch path, float32 x, α rows {ALPHAS}; "
          f"torch threads {torch.get_num_threads()}, median of {args.reps} alternated calls; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; {time.time() - started:.0f} s")
    print(f"{'matrix':17s} {'K->N':11} {'M':>4} {'mix KiB':>8} {'low KiB':>8} {'rank':>5} {'mix ‖Δ‖²':>7} "
          f"{'low ‖Δ‖²':>7} {'mix us':>9} {'low us':>9} {'ratio':>6}")
    print("\n".join(lines))
    print("geometric mean time ratio mixed / lowrank by M: " + ", ".join(
        f"M={m}: {statistics.geometric_mean(r):.2f}" for m, r in ratios.items()))


if __name__ == "__main__":
    main()
