"""The per-rank memory plan in docs/deploy.md: a Llama-2-70B-shaped pair served with
`--tensor-parallel-size N`, bf16 W plus Δ in each encoding, from the encodings' real byte counts.

- Parameters: every name and shape of transformers' LlamaForCausalLM with Llama 2 70B's config,
  built on the meta device (no memory, no download).
- Slices: `TensorParallel.split` (expo_serve/model/parallel.py), the layout the engine loads.
- Bytes: `encode_delta` run on a probe of each slice, a few rows at the slice's true width. Every
  part of every encoding here is per output row (dense values; int8 codes and scale; int4 nibbles
  and group scales; bit signs and scale), so a slice of R rows costs R/probe times the probe,
  exactly; each figure is also checked against the closed formula below.
- KV cache: the engine's own `kv_bytes_per_block`, at one token per block.

Arithmetic, not a measurement: activations, CUDA graphs, NCCL buffers and the CUDA context come
on top (RESERVE_GIB below is an allowance for them, not a measured figure).

    python bench/deploy_memory.py [--ranks 1 4 8] [--group-size 128]
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from expo_kernels import encode_delta  # noqa: E402
from expo_kernels.encode import DEFAULT_GROUP_SIZE  # noqa: E402

from expo_serve.engine.model_runner import kv_bytes_per_block  # noqa: E402
from expo_serve.model.parallel import TensorParallel  # noqa: E402

GIB = 2**30
ENCODINGS = ("dense", "int8", "int4", "bit")
BF16 = 2
PROBE_ROWS = 4
# Per rank, beyond W, Δ and the KV cache: CUDA context, activations, CUDA graphs, NCCL buffers.
RESERVE_GIB = 3.0
# Total memory as nvidia-smi reports it (MiB): H100 SXM 80 GB, H200 141 GB.
CARDS = {"H100 80GB": 81559 / 1024, "H200 141GB": 143771 / 1024}


def llama2_70b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def rank_shape(name: str, shape: tuple[int, ...], config, ranks: int) -> tuple[int, ...]:
    """The shape of rank 0's slice (every rank's is the same size: the split is even)."""
    if ranks == 1:
        return shape
    split = TensorParallel(rank=0, size=ranks).split(name, config)
    if split is None:
        return shape
    dim, start, stop = split
    return tuple(stop - start if d == dim else n for d, n in enumerate(shape))


def formula_bytes(shape: tuple[int, ...], encoding: str, group_size: int) -> int:
    """What each encoding stores for a bf16 Δ of `shape` (encode.py's layouts; scales are float32)."""
    if len(shape) == 1 or encoding == "dense":
        return math.prod(shape) * BF16
    n, k = shape
    return n * {"int8": k + 4,
                "int4": math.ceil(k / 2) + 4 * math.ceil(k / group_size),
                "bit": math.ceil(k / 8) + 4}[encoding]


@functools.cache  # 80 layers repeat a handful of shapes
def encoded_bytes(shape: tuple[int, ...], encoding: str, group_size: int) -> int:
    """Bytes of `encode_delta` on a slice of this shape, from a probe of PROBE_ROWS rows."""
    if len(shape) == 1:
        probe = encode_delta(torch.randn(shape, dtype=torch.bfloat16), encoding, group_size=group_size)
        return probe.nbytes
    rows, width = shape
    probe_rows = min(rows, PROBE_ROWS)
    probe = encode_delta(torch.randn(probe_rows, width, dtype=torch.bfloat16), encoding, group_size=group_size)
    assert all(part.shape[0] == probe_rows for part in probe.parts().values()), f"{encoding} has a part not per row"
    return probe.nbytes // probe_rows * rows


def check_formula(group_size: int) -> None:
    """The closed formula against encode_delta on whole tensors of odd shapes."""
    for shape in [(6, 42), (123, 431), (7, group_size + 3), (64,)]:
        for encoding in ENCODINGS:
            real = encode_delta(torch.randn(shape, dtype=torch.bfloat16), encoding, group_size=group_size).nbytes
            assert real == formula_bytes(shape, encoding, group_size), (shape, encoding, real)


def plan(ranks: int, group_size: int) -> dict:
    config = llama2_70b_config()
    if ranks > 1:
        TensorParallel.check(config, ranks)
    w, delta = 0, defaultdict(int)
    for name, shape in parameter_shapes(config).items():
        local = rank_shape(name, shape, config, ranks)
        w += math.prod(local) * BF16
        for encoding in ENCODINGS:
            measured = encoded_bytes(local, encoding, group_size)
            assert measured == formula_bytes(local, encoding, group_size), (name, local, encoding)
            delta[encoding] += measured
    kv_heads = TensorParallel(rank=0, size=ranks).local_heads(config)[1] if ranks > 1 else config.num_key_value_heads
    kv_token = kv_bytes_per_block(config, 1, torch.bfloat16, kv_heads=kv_heads)
    return {"ranks": ranks, "w": w, "delta": dict(delta), "kv_token": kv_token, "kv_heads": kv_heads}


def kv_tokens(card_gib: float, held: int, kv_token: int) -> int:
    """Tokens of KV cache per rank by the engine's rule (90% of what the model leaves free)."""
    free = card_gib * GIB - held - RESERVE_GIB * GIB
    return max(0, int(free * 0.9) // kv_token)


def report(plans: list[dict], group_size: int) -> str:
    lines = [f"Llama-2-70B shapes, bf16 W; Δ stored as each encoding (int4 group {group_size}); per rank, GiB.", "",
             "| ranks | W | Δ dense | Δ int8 | Δ int4 | Δ bit | W+Δ dense | W+Δ int8 | W+Δ int4 | W+Δ bit |"
             " KV / token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        deltas = [p["delta"][e] for e in ENCODINGS]
        cells = [p["w"]] + deltas + [p["w"] + d for d in deltas]
        lines.append(f"| {p['ranks']} | " + " | ".join(f"{c / GIB:.1f}" for c in cells)
                     + f" | {p['kv_token'] / 1024:.0f} KiB ({p['kv_heads']} kv heads) |")
    lines += ["", "Δ / W: " + ", ".join(f"{e} {plans[0]['delta'][e] / plans[0]['w']:.3f}" for e in ENCODINGS), "",
              f"KV-cache tokens per rank (= per replica) left by the engine's rule, 90% of free memory after W + Δ"
              f" and a {RESERVE_GIB:.0f} GiB allowance for context, activations, graphs and NCCL; 0: does not fit.", "",
              "| ranks | card | " + " | ".join(f"Δ {e}" for e in ENCODINGS) + " |",
              "|---|---|" + "---|" * len(ENCODINGS)]
    for p in plans:
        for card, gib in CARDS.items():
            lines.append(f"| {p['ranks']} | {card} | "
                         + " | ".join(f"{kv_tokens(gib, p['w'] + p['delta'][e], p['kv_token']):,}" for e in ENCODINGS)
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    args = parser.parse_args()
    check_formula(args.group_size)
    print(report([plan(n, args.group_size) for n in args.ranks], args.group_size))


if __name__ == "__main__":
    main()
