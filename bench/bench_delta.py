"""Delta sizes and compression quality on the demo pair (issue 2), as markdown tables.

For every encoding: stored size, compression ratio against a dense bf16 Δ, build time, the
overall relative error ‖Δ − decoded‖/‖Δ‖, and for α ∈ {0, 0.3, 1, 2.5} the share of the alignment
shift that compression loses, mean per-token KL(exact ‖ compact) / KL(exact ‖ θ_sft), next to
KL(exact ‖ compact) itself, over the shipped preference texts (prompt + chosen and prompt +
rejected, chat-formatted). "bit distilled" is `--format bit --distill` with the default recipe but
calibrated on the other preference pairs (prompt + chosen of the rows past the evaluated ones), so
no evaluated text was seen by the fit.
"mixed" is `--format mixed --bits B` (8/4/2-bit bands of singular vectors). "→ PEFT" rows are what
`delta export --peft` of a delta carries (its norms' and biases' Δ left out): the share of the
shift a LoRA server keeps at scale 1+α.

    python bench/bench_delta.py [--texts 64] [--only "bit,bit distilled"]
"""
from __future__ import annotations

import argparse
import atexit
import json
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
    ("bit distilled", "bit", {"distill": True}),
    ("lowrank r64", "lowrank", {"rank": 64}),
    ("lowrank r16", "lowrank", {"rank": 16}),
    ("mixed 1.5 bits", "mixed", {"bits": 1.5}),
    ("mixed 1.0 bit", "mixed", {"bits": 1.0}),
]
# What `delta export --peft` of a delta carries: every tensor but the norms' and biases' Δ.
PEFT_EXPORTS = [("lowrank r64 → PEFT", "lowrank r64"), ("mixed 1.0 bit → PEFT", "mixed 1.0 bit")]


def _peft_part(folder: Path, out: Path) -> Path:
    """The delta as its PEFT adapter has it: the 1-D Δ (norms, biases) dropped, the rest as built."""
    from expo_serve.delta.export_peft import export_peft
    from expo_serve.delta.store import MANIFEST

    left_out = export_peft(folder, out.with_name(out.name + "-adapter"))["left_out"]
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in left_out:
        manifest["tensors"][name].update(encoding="zero", parts={}, params={})
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64, help="evaluation texts (from the shipped preference pairs)")
    parser.add_argument("--only", help="comma-separated labels of the variants to build and score (default: all)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from expo_serve.delta.build import build_delta
    from expo_serve.delta.distill import DistillConfig
    from expo_serve.delta.inspect import delta_report
    from expo_serve.delta.quality import ALPHAS, format_quality_table, quality_report
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
    unseen = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in list(load_preferences())[(args.texts + 1) // 2:]]  # rows whose texts are not evaluated

    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    atexit.register(shutil.rmtree, work, True)  # its model copies take gigabytes
    calibration = work / "calibration.jsonl"
    calibration.write_text("".join(json.dumps(row) + "\n" for row in unseen))
    sft, aligned = open_source(pair.sft_dir), open_source(pair.aligned_dir)
    build_delta(sft, aligned, work / "exact", dtype="float32")
    sizes, compact = [], {}
    chosen = set(args.only.split(",")) if args.only else None
    for label, encoding, options in VARIANTS:
        if chosen is not None and label not in chosen:
            continue
        folder = work / label.replace(" ", "-")
        started = time.perf_counter()
        if options.get("distill"):
            options = {**options, "distill": DistillConfig(calibration=calibration)}
        build_delta(sft, aligned, folder, encoding=encoding, **options)
        seconds = time.perf_counter() - started
        report = delta_report(DeltaCheckpoint(folder))
        sizes.append((label, report, seconds))
        compact[label] = DeltaCheckpoint(folder)
        print(f"built {label} in {seconds:.1f} s", file=sys.stderr)
    for label, source in PEFT_EXPORTS:
        if chosen is not None and not {label, source} <= chosen:
            continue
        compact[label] = DeltaCheckpoint(_peft_part(work / source.replace(" ", "-"), work / label.replace(" ", "-")))
    rows = quality_report(sft, pair.sft_dir, DeltaCheckpoint(work / "exact"), compact, texts, ALPHAS)

    print(f"Demo pair (SmolLM2-135M-Instruct SFT + local DPO), {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} CPU, torch {torch.__version__}; {len(texts)} evaluation texts.\n")
    print("| encoding | stored | vs dense bf16 | ‖Δ−decoded‖/‖Δ‖ | build |")
    print("|---|---:|---:|---:|---:|")
    for label, report, seconds in sizes:
        print(f"| {label} | {report['stored_bytes'] / 2**20:.1f} MiB | {report['compression_ratio']:.2f}× | "
              f"{report['overall_rel_error']:.4f} | {seconds:.1f} s |")
    print(f"\nDense bf16 Δ of this model: {sizes[0][1]['dense_bf16_bytes'] / 2**20:.1f} MiB.\n")
    print("Per α: lost = share of the alignment shift lost, KL(exact‖compact) / KL(exact‖θ_sft); "
          "KL = KL(exact‖compact) in nats/token; both mean per token:\n")
    print(format_quality_table(rows))


if __name__ == "__main__":
    main()
