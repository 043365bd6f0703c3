"""The independent reference: Hugging Face transformers on the float32 reference merge.

θ(α) = θ_sft + (1+α)·(θ_aligned − θ_sft) is computed here with plain torch on state dicts read by
transformers, never through expo-serve's own merge code.
"""
from __future__ import annotations

from functools import lru_cache

import torch

# One generate call's mix of α (θ_sft, θ_aligned, between, far beyond) and prompts of several shapes,
# shared by the exactness tests of one rank and of several.
ALPHAS = [-1.0, 0.0, 0.3, 2.5]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "Paris is the capital of",
    "def add(a, b):\n    return",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 and the quick brown fox",
]


@lru_cache(maxsize=8)
def _states(sft_dir: str, aligned_dir: str):
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32)
    return ({n: p.detach().clone() for n, p in sft.named_parameters()},
            {n: p.detach().clone() for n, p in aligned.named_parameters()})


def reference_model(sft_dir, aligned_dir, alpha: float):
    from transformers import AutoModelForCausalLM

    sft_state, aligned_state = _states(str(sft_dir), str(aligned_dir))
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(sft_state[name] + (1.0 + alpha) * (aligned_state[name] - sft_state[name]))
    return model


def decoded_merge_model(sft_dir, delta_dir, alpha: float):
    """HF on θ_sft + (1+α)·Δ with Δ as a delta folder decodes it: what a compact Δ must equal."""
    from transformers import AutoModelForCausalLM

    from expo_serve.delta.store import DeltaCheckpoint

    decoded = {name: d.dequantize() for name, d in DeltaCheckpoint(delta_dir)}
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(param + decoded[name] * (1.0 + alpha))
    return model


@torch.no_grad()
def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (no EOS stop) and the log-softmax at every generated step, [steps, V]."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    log_probs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    return tokens, log_probs


@torch.no_grad()
def reference_prompt_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax at every position of a teacher-forced sequence, [len-1, V] (row p predicts p+1)."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)
