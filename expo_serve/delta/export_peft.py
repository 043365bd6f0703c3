"""`expo-serve delta export --peft DIR`: a low-rank Δ as a PEFT LoRA adapter, for other servers.

A `lowrank` (or `mixed`) Δ of a linear layer is already B·A; written as LoRA factors with scale 1
(lora_alpha = r) it is the aligned model's shift, and a server that takes a per-request LoRA scale
(llama.cpp's `lora: [{id, scale}]`, vLLM's LoRA scaling) serves ExPO approximately with scale = 1+α.
The embedding's Δ goes in as LoRA on the embedding (and, when the lm_head is tied to it, on the
lm_head too). What PEFT cannot carry as a scaled delta (the norms' and biases' Δ: PEFT would save
their values, not a shift it scales) is left out and listed; so is any tensor stored in an encoding
that is not low rank. No peft import is needed to write the adapter; peft reads it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..atomic_dir import atomic_output_dir, check_output_dir
from ..errors import ExpoError
from .store import DeltaCheckpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_EMBEDDING = "model.embed_tokens.weight"


def _factors(delta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [R, K], B [N, R]) in float32 with Δ = B·A, for an encoding that stores such factors."""
    if delta.encoding == "lowrank":
        return delta.a.to(torch.float32), delta.b.to(torch.float32)
    if hasattr(delta, "factors"):  # an encoding that stores quantized factors decodes them, never Δ
        return delta.factors()
    return None


def export_peft(folder: str | Path, out: str | Path) -> dict:
    """Write the adapter to `out`; returns {"modules", "rank", "left_out": {tensor: why}}."""
    delta = DeltaCheckpoint(folder)
    if delta.manifest.get("layout"):
        raise ExpoError(f"the delta in {delta.folder} stores {delta.manifest['architecture']} tensors under other names "
                        "than its checkpoint's; a PEFT adapter for it would not match the model's own modules")
    check_output_dir(out)
    tied_lm_head = any(canonical == _EMBEDDING for canonical in delta.tied.values())
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    left_out: dict[str, str] = {}
    for name, entry in delta.entries.items():
        if entry.encoding == "zero":
            continue
        if len(entry.shape) != 2:
            left_out[name] = "a norm or bias Δ: PEFT stores such parameters whole, not as a shift it can scale"
            continue
        factors = _factors(delta.load(name))
        if factors is None:
            left_out[name] = f"stored as {entry.encoding}, not low rank"
            continue
        a, b = factors
        module = name.removesuffix(".weight")
        if name == _EMBEDDING:
            # PEFT's embedding LoRA adds (B·A)ᵀ with A [R, vocab] and B [hidden, R].
            weights[f"base_model.model.{module}.lora_embedding_A"] = b.T.contiguous()
            weights[f"base_model.model.{module}.lora_embedding_B"] = a.T.contiguous()
            ranks[module] = a.shape[0]
            if tied_lm_head:  # the tied output projection carries the same Δ, as a linear LoRA
                weights["base_model.model.lm_head.lora_A.weight"] = a.contiguous()
                weights["base_model.model.lm_head.lora_B.weight"] = b.contiguous()
                ranks["lm_head"] = a.shape[0]
            continue
        weights[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = a.shape[0]
    if not ranks:
        raise ExpoError(f"the delta in {delta.folder} has no low-rank tensor to export; build it with --format lowrank or mixed")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # Scale 1 everywhere: lora_alpha = r for each module, so a LoRA scale of 1+α gives θ_sft + (1+α)·Δ.
    patterns = {re.escape(module): r for module, r in ranks.items() if r != rank}  # PEFT matches them as regexes
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": delta.manifest["sft"]["source"],
        "r": rank, "lora_alpha": rank, "rank_pattern": patterns, "alpha_pattern": patterns,
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    from safetensors.torch import save_file

    with atomic_output_dir(out) as tmp:
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return {"modules": len(ranks), "rank": rank, "left_out": left_out}
