"""ExPO-aware layers: every parameter p is served as p_sft + (1+α)·Δp, with α per token row.

- ExpoLinear: y = x·Wᵀ + (1+α)·x·Δᵀ through `expo_linear` (Triton on CUDA, torch on a CPU), plus
  b + (1+α)·Δb. Fused modules (q/k/v, gate/up) load each shard's W and Δ into their rows.
- ExpoEmbedding: E[t] + (1+α)·ΔE[t], decoding only the looked-up rows of Δ.
- ExpoRMSNorm: the normalized x times w + (1+α)·Δw.
For norms and embeddings the per-row parameter is formed exactly as the reference merge forms it
(θ_sft + Δ·(1+α) in float32), so those layers match a merged checkpoint bit for bit.

The step context (StepContext) is how every layer learns the batch it runs: built once per step
by the model runner and published with set_context. One forward pass runs a flat batch of token
rows from several sequences (new prompt tokens, possibly a chunk of a prompt, and decode tokens
alike); `alpha` and `scale` hold each row's α and 1+α, and the attention metadata says where each
row's keys live. Nothing else carries α below the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from expo_kernels import DenseDelta, EncodedDelta, ZeroDelta, concat_rows, expo_linear

from ..delta.merge import expo_merge_tensor


# -- the step context ------------------------------------------------------------------------------

@dataclass
class StepContext:
    alpha: torch.Tensor  # [T] float32: the α of each token row
    scale: torch.Tensor  # [T] float32: 1+α, rounded once from double as the reference merge does
    positions: torch.Tensor  # [T] int64: position of each row in its sequence
    slot_mapping: torch.Tensor  # [T] int64: flat KV-cache slot each row's key/value is written to
    block_tables: torch.Tensor  # [B, max_blocks] int64: each sequence's KV blocks (padded with 0)
    context_lens: torch.Tensor  # [B] int64: keys each sequence attends to after this step
    query_lens: list[int]  # new rows per sequence, in row order
    max_context_len: int
    # Row r of the flat batch is query query_index[r] of sequence seq_index[r] (for padded attention).
    seq_index: torch.Tensor
    query_index: torch.Tensor
    is_decode_only: bool
    # Host side, when the α cache serves some rows: each row's slot of merged weights (None: the
    # fused path). Rows of one slot are adjacent (the runner orders the batch so).
    row_slots: list[int | None] | None = None
    # [B] int64, only under dynamic NTK rope when some sequence is past max_position_embeddings:
    # each sequence's rope length (engine/model_runner.py; model/llama.py, RotaryEmbedding).
    rope_lens: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def rows(self, index: torch.Tensor, host_index: list[int]) -> "StepContext":
        """The context of some of this step's rows (those whose logits are computed): their α and
        slots. `index` is `host_index` on the device."""
        slots = None if self.row_slots is None else [self.row_slots[i] for i in host_index]
        return replace(self, alpha=self.alpha.index_select(0, index), scale=self.scale.index_select(0, index),
                       row_slots=slots, _masks={}, _memo={})

    def memo(self, key: str, compute: Callable[[], object]):
        """compute() once per step: for what every layer asks alike (the rotary's per-row cos/sin)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @cached_property
    def segments(self) -> list[tuple[int, int, int | None]] | None:
        """Runs of rows sharing a slot, as (start, end, slot); None when no row has one. Worked
        out once per context: every linear layer of the step asks."""
        if self.row_slots is None:
            return None
        runs: list[tuple[int, int, int | None]] = []
        for row, slot in enumerate(self.row_slots):
            if runs and runs[-1][2] == slot:
                runs[-1] = (runs[-1][0], row + 1, slot)
            else:
                runs.append((row, row + 1, slot))
        return runs

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    def attention_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, max_q, max_k] bool: row i of sequence b may see key j (causal, in range,
        within the sliding window when there is one). Built once per step and window size."""
        if window not in self._masks:
            device = self.positions.device
            num_seqs, max_q, max_k = self.num_seqs, self.max_query_len, self.max_context_len
            query_pos = torch.full((num_seqs, max_q), -1, dtype=torch.int64, device=device)
            query_pos[self.seq_index, self.query_index] = self.positions
            key_pos = torch.arange(max_k, device=device)
            mask = key_pos[None, None, :] <= query_pos[:, :, None]
            if window is not None:
                mask &= key_pos[None, None, :] > query_pos[:, :, None] - window
            # A padding query row sees key 0, so softmax stays finite; its output is dropped.
            mask[:, :, 0] |= query_pos < 0
            self._masks[window] = mask.unsqueeze(1)
        return self._masks[window]


_CONTEXT: StepContext | None = None


def set_context(context: StepContext | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> StepContext:
    if _CONTEXT is None:
        raise RuntimeError("no step context: a model forward must run inside the model runner")
    return _CONTEXT


# -- the layers ------------------------------------------------------------------------------------

Merged = dict[int, tuple[torch.Tensor, torch.Tensor | None]]  # α-cache slot -> (W + (1+α)Δ, bias at α)


def linear_by_alpha(x: torch.Tensor, fused: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], merged: Merged,
                    out_features: int) -> torch.Tensor:
    """x's rows through `fused(x_rows, alpha_rows)`, except rows whose α has merged weights in
    the α cache: those run one plain product per α (engine/model_runner.py, AlphaCache)."""
    ctx = get_context()
    segments = ctx.segments
    if segments is None:
        return fused(x, ctx.alpha)
    if len(segments) == 1 and segments[0][2] is not None:
        return F.linear(x, *merged[segments[0][2]])
    out = x.new_empty((x.shape[0], out_features))
    for start, end, slot in segments:
        rows = x[start:end]
        out[start:end] = fused(rows, ctx.alpha[start:end]) if slot is None else F.linear(rows, *merged[slot])
    return out


def merge_at(weight: torch.Tensor, delta: EncodedDelta, alpha: float) -> torch.Tensor:
    """W + (1+α)·Δ in float32 by the reference merge's formula, stored in W's dtype; W itself
    where Δ is zero (what the formula gives, without a copy)."""
    if delta.encoding == "zero":
        return weight
    return expo_merge_tensor(weight, delta, alpha).to(weight.dtype)


class ExpoLinear(nn.Module):
    """A linear layer over θ_sft and an encoded Δ; `shards` names the HF modules fused into it."""

    def __init__(self, in_features: int, shards: dict[str, int], *, bias: bool, dtype: torch.dtype, device):
        super().__init__()
        self.in_features = in_features
        self.shards = dict(shards)
        self.out_features = sum(shards.values())
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.delta: EncodedDelta = ZeroDelta(shape=(self.out_features, in_features))
        self.delta_bias: torch.Tensor | None = None
        self.merged: Merged = {}
        self._pending: dict[str, dict[str, EncodedDelta]] = {"weight": {}, "bias": {}}

    def _rows(self, shard: str) -> slice:
        start = 0
        for name, size in self.shards.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def load_base(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        target = self.weight if kind == "weight" else self.bias
        target.data[self._rows(shard)].copy_(tensor)

    def load_delta(self, shard: str, kind: str, delta: EncodedDelta) -> None:
        self._pending[kind][shard] = delta

    def finalize(self) -> None:
        """Join the shards' deltas once all are loaded (a shard never given counts as zero)."""
        dtype = self.weight.dtype
        weights = [self._pending["weight"].get(s, ZeroDelta(shape=(n, self.in_features))) for s, n in self.shards.items()]
        self.delta = concat_rows(weights, dtype) if len(weights) > 1 else weights[0]
        if self.bias is not None:
            biases = [self._pending["bias"].get(s, ZeroDelta(shape=(n,))) for s, n in self.shards.items()]
            joined = concat_rows(biases, dtype)
            self.delta_bias = None if isinstance(joined, ZeroDelta) else joined.dequantize(dtype).to(self.weight.device)
        self._pending = {"weight": {}, "bias": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_by_alpha(x, self._fused, self.merged, self.out_features)

    def _fused(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return expo_linear(x, self.weight, self.delta, alpha, bias=self.bias, delta_bias=self.delta_bias)

    def fill_alpha_slot(self, slot: int, alpha: float) -> None:
        bias = self.bias
        if self.delta_bias is not None:
            bias = merge_at(self.bias, DenseDelta(shape=tuple(self.bias.shape), delta=self.delta_bias), alpha)
        self.merged[slot] = (merge_at(self.weight, self.delta, alpha), bias)

    @property
    def merged_bytes(self) -> int:
        """What one α-cache slot of this layer holds."""
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class ExpoEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, *, dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype, device=device), requires_grad=False)
        self.delta: EncodedDelta = ZeroDelta(shape=(num_embeddings, dim))
        self.merged: Merged = {}  # only for a tied lm_head's product (lookups are exact per row already)

    def load_base(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        self.weight.data.copy_(tensor)

    def load_delta(self, shard: str, kind: str, delta: EncodedDelta) -> None:
        self.delta = delta

    def finalize(self) -> None:
        pass

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """As a tied lm_head: hidden · (E + (1+α)·ΔE)ᵀ, α per row."""
        fused = lambda x, alpha: expo_linear(x, self.weight, self.delta, alpha)  # noqa: E731
        return linear_by_alpha(hidden, fused, self.merged, self.weight.shape[0])

    def fill_alpha_slot(self, slot: int, alpha: float) -> None:
        self.merged[slot] = (merge_at(self.weight, self.delta, alpha), None)

    @property
    def merged_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(token_ids, self.weight)
        if isinstance(self.delta, ZeroDelta):
            return rows
        scale = get_context().scale
        if isinstance(self.delta, DenseDelta):
            delta_rows = F.embedding(token_ids, self.delta.delta).to(torch.float32)
        else:
            delta_rows = self.delta.rows(token_ids, torch.float32)
        return (rows.to(torch.float32) + delta_rows * scale[:, None]).to(rows.dtype)


class ExpoRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.delta: torch.Tensor | None = None

    def load_base(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        self.weight.data.copy_(tensor)

    def load_delta(self, shard: str, kind: str, delta: EncodedDelta) -> None:
        self.delta = None if isinstance(delta, ZeroDelta) else delta.dequantize(torch.float32).to(self.weight.device)

    def finalize(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The order of operations is transformers' LlamaRMSNorm, so the result matches it exactly.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.delta is None:
            return self.weight * h.to(dtype)
        weight = self.weight.to(torch.float32)[None, :] + self.delta[None, :] * get_context().scale[:, None]
        return weight.to(dtype) * h.to(dtype)
