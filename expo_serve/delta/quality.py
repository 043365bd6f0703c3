"""How much of the alignment shift a compact encoding loses.

For each α: KL(p_exact ‖ p_compact) / KL(p_exact ‖ p_sft), the mean per-token KL divergence
between the exact ExPO model θ_sft + (1+α)Δ and the same with the decoded compact Δ, over the
KL between the exact model and θ_sft (the whole shift that α = −1 would undo). 0 means nothing
is lost; 1 means the compression loses as much as dropping the delta altogether. The report
shows that share and the KL itself (nats per token) for every encoding and α: at large α the
exact model's own shift grows, so a small share can still be a large KL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import expo_merge_tensor
from .sources import ModelSource
from .store import DeltaCheckpoint


ALPHAS = (0.0, 0.3, 1.0, 2.5)


@dataclass
class QualityRow:
    encoding: str
    alpha: float
    kl_compact: float  # mean per-token KL(exact ‖ compact)
    kl_sft: float  # mean per-token KL(exact ‖ θ_sft)

    @property
    def shift_lost(self) -> float:
        return self.kl_compact / self.kl_sft if self.kl_sft > 0 else float("nan")


class _Evaluator:
    """One transformers model whose weights are swapped per variant, scoring fixed texts."""

    def __init__(self, folder, texts: list[str]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.batch = tokenizer(texts, return_tensors="pt", padding=True)

    @torch.no_grad()
    def log_probs(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probabilities at every real (unpadded) position, [tokens, vocab]."""
        for name, value in weights.items():
            self.model.get_parameter(name).copy_(value)
        logits = self.model(**self.batch).logits.float()
        mask = self.batch["attention_mask"].bool()
        return torch.log_softmax(logits[mask], dim=-1)


def _mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    # In float64: the KL of a near-exact encoding is ~1e-7 nats, below float32's rounding of the sum.
    p_log, q_log = p_log.double(), q_log.double()
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def quality_report(
    sft: ModelSource,
    sft_folder,
    exact: DeltaCheckpoint,
    compact: dict[str, DeltaCheckpoint],
    texts: list[str],
    alphas=ALPHAS,
) -> list[QualityRow]:
    """Rows for every (encoding, α). `exact` must be a dense float32 delta of the same pair."""
    evaluator = _Evaluator(sft_folder, texts)
    base = {name: sft.get(name).to(torch.float32) for name in sft.parameter_names}
    exact_deltas = dict(exact)
    sft_log = evaluator.log_probs(base)
    rows = []
    for alpha in alphas:
        exact_log = evaluator.log_probs({n: expo_merge_tensor(base[n], exact_deltas[n], alpha) for n in base})
        kl_sft = _mean_kl(exact_log, sft_log)
        for label, delta in compact.items():
            compact_log = evaluator.log_probs({n: expo_merge_tensor(base[n], d, alpha) for n, d in delta})
            rows.append(QualityRow(label, alpha, _mean_kl(exact_log, compact_log), kl_sft))
    return rows


def format_quality_table(rows: list[QualityRow]) -> str:
    """A markdown table: per encoding (in the rows' order) and α, the share of the shift lost and
    KL(exact ‖ compact); then KL(exact ‖ θ_sft) per α, the whole shift the shares are of."""
    alphas = list(dict.fromkeys(r.alpha for r in rows))
    labels = list(dict.fromkeys(r.encoding for r in rows))
    cell = {(r.encoding, r.alpha): r for r in rows}
    lines = [
        "| encoding | " + " | ".join(f"α = {a:g}: lost | α = {a:g}: KL" for a in alphas) + " |",
        "|---|" + "---:|---:|" * len(alphas),
    ]
    for label in labels:
        cells = [cell[(label, a)] for a in alphas]
        lines.append(f"| {label} | " + " | ".join(f"{c.shift_lost:.2e} | {c.kl_compact:.2e}" for c in cells) + " |")
    kl_sft = {a: next(r.kl_sft for r in rows if r.alpha == a) for a in alphas}
    lines.append("")
    lines.append("KL(exact‖θ_sft), the whole shift: " + ", ".join(f"α = {a:g}: {v:.4f}" for a, v in kl_sft.items()) + " nats/token")
    return "\n".join(lines)
