"""From logits to tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits at that α),
which is what evaluation harnesses score. Penalties and truncation shape only the choice.
"""
from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sequence import Sequence

MIN_TEMPERATURE = 1e-2


def top_logprobs(log_probs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row: the chosen token's logprob and the k best alternatives."""
    chosen_lp = log_probs.gather(1, chosen[:, None]).squeeze(1).tolist()
    chosen_ids = chosen.tolist()
    if k > 0:
        values, indices = log_probs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(chosen_ids, chosen_lp, tops)]


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _suppress_stops(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Before min_tokens, a stop token may not be chosen."""
    if seq.num_output_tokens < seq.params.min_tokens and seq.stop_token_ids:
        logits[list(seq.stop_token_ids)] = float("-inf")
    return logits


def _draw(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    # Hostile but valid values must not make the draw fail. A temperature below MIN_TEMPERATURE
    # is used as that (as vLLM does: logits / T would overflow, and T may round to 0 in float32);
    # a tiny repetition penalty still yields +inf, which softmax turns into NaN, so +inf becomes
    # the largest float: the token stays the certain choice.
    scaled = torch.nan_to_num(logits / max(p.temperature, MIN_TEMPERATURE), posinf=torch.finfo(logits.dtype).max)
    if p.top_k > 0 and p.top_k < scaled.shape[0]:
        kth = scaled.topk(p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop = before >= p.top_p * sorted_probs.sum()
        drop[0] = False  # the likeliest token always stays (a tiny top_p may round to 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token for each row of `logits` ([R, V] float32, row i belongs to seqs[i])."""
    logits = logits.float()
    wants_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_log_probs = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
    shaped = logits
    needs_shaping = [
        s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        or s.num_output_tokens < s.params.min_tokens
        for s in seqs
    ]
    if any(needs_shaping):
        shaped = logits.clone()
        for i, seq in enumerate(seqs):
            if needs_shaping[i]:
                _suppress_stops(_apply_penalties(shaped[i], seq), seq)
    chosen = shaped.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            chosen[i] = _draw(shaped[i].to("cpu"), seq)
    tokens = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if raw_log_probs is not None:
        rows = [i for i, w in enumerate(wants_logprobs) if w]
        k = max(seqs[i].params.logprobs for i in rows)
        found = top_logprobs(raw_log_probs[rows], chosen[rows].to(raw_log_probs.device), k)
        for i, lp in zip(rows, found):
            lp.top = lp.top[: seqs[i].params.logprobs]
            logprobs[i] = lp
    return tokens, logprobs
