"""Per-step batch metadata, built once by the model runner and read by every layer.

One forward pass runs a flat batch of token rows from several sequences: new prompt tokens
(possibly a chunk of a prompt) and decode tokens alike. `alpha` holds each row's α, so every
ExPO layer combines W and Δ per row; the attention metadata says where each row's keys live.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


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
    _masks: dict = field(default_factory=dict)

    def rows(self, index: torch.Tensor, host_index: list[int]) -> "StepContext":
        """The context of some of this step's rows (those whose logits are computed): their α and
        slots. `index` is `host_index` on the device."""
        slots = None if self.row_slots is None else [self.row_slots[i] for i in host_index]
        return replace(self, alpha=self.alpha.index_select(0, index), scale=self.scale.index_select(0, index),
                       row_slots=slots, _masks={})

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
