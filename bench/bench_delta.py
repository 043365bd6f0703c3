"""Delta sizes and compression quality on the demo pair (issue 2), as markdown tables.

For every encoding: stored size, compression ratio against a dense bf16 Δ, build time, the
overall relative error ‖Δ − decoded‖/‖Δ‖, and for α ∈ {0, 0.3, 1} the share of the alignment
shift that compression loses: mean per-token KL(exact ‖ compact) / KL(exact ‖ θ_sft), over the
shipped preference texts (prompt + chosen and prompt + rejected, chat-formatted).

    python bench/bench_delta.py [--texts 64]
"""
from __future__ import annotations

import argparse
import atexit
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (label, encoding, options)
    ("dense bf16", "dense", {"dtype": "bfloat16"}),
    ("int8", "int8", {}),
    ("int4 g128", "int4", {"group_size": 128}),
    ("int4 g32", "int4", {"group_size": 32}),
    ("bit", "bit", {}),
    ("lowrank r64", "lowrank", {"rank": 64}),
    ("lowrank r16", "lowrank", {"rank": 16}),
]
ALPHAS = (0.0, 0.3, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64, help="evaluation texts (from the shipped preference pairs)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.inspect import delta_report
    from expo_serve.delta.quality import quality_report
    from expo_serve.delta.sources import open_source
    from expo_serve.delta.store import DeltaCheckpoint
    from expo_serve.demo.pair import load_preferences, prepare_demo_pair

    pair = prepare_demo_pair(log=lambda m: print(m, file=sys.stderr))
    tokenizer = AutoTokenizer.from_pretrained(pair.aligned_dir)
    texts = []
    for row in load_preferences():
        for answer in (row["chosen"], row["rejected"]):
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    texts = texts[: args.texts]

    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    build_delta(sft, aligned, work / "exact", dtype="float32")
    sizes, compact = [], {}
    for label, encoding, options in VARIANTS:
        folder = work / label.replace(" ", "-")
        started = time.perf_counter()
        build_delta(sft, aligned, folder, encoding=encoding, **options)
        seconds = time.perf_counter() - started
        report = delta_report(DeltaCheckpoint(folder))
        sizes.append((label, report, seconds))
        compact[label] = DeltaCheckpoint(folder)
        print(f"built {label} in {seconds:.1f} s", file=sys.stderr)
    rows = quality_report(sft, pair.sft_dir, DeltaCheckpoint(work / "exact"), compact, texts, ALPHAS)

    print(f"Demo pair (SmolLM2-135M-Instruct SFT + local DPO), {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} CPU, torch {torch.__version__}; {len(texts)} evaluation texts.\n")
    print("| encoding | stored | vs dense bf16 | ‖Δ−decoded‖/‖Δ‖ | build |")
    print("|---|---:|---:|---:|---:|")
    for label, report, seconds in sizes:
        print(f"| {label} | {report['stored_bytes'] / 2**20:.1f} MiB | {report['compression_ratio']:.2f}× | "
              f"{report['overall_rel_error']:.4f} | {seconds:.1f} s |")
    print(f"\nDense bf16 Δ of this model: {sizes[0][1]['dense_bf16_bytes'] / 2**20:.1f} MiB.\n")
    print("Share of the alignment shift lost, KL(exact‖compact) / KL(exact‖θ_sft), mean per token:\n")
    print("| encoding | " + " | ".join(f"α = {a:g}" for a in ALPHAS) + " |")
    print("|---|" + "---:|" * len(ALPHAS))
    for label, _, _ in sizes:
        cells = [next(r for r in rows if r.encoding == label and r.alpha == a) for a in ALPHAS]
        print(f"| {label} | " + " | ".join(f"{c.shift_lost:.2e}" for c in cells) + " |")
    kl_sft = {a: next(r.kl_sft for r in rows if r.alpha == a) for a in ALPHAS}
    print("\nKL(exact‖θ_sft) itself: " + ", ".join(f"α = {a:g}: {v:.4f} nats/token" for a, v in kl_sft.items()))


if __name__ == "__main__":
    main()
