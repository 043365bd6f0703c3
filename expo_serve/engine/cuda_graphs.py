"""CUDA graphs for decode steps: one captured forward per bucket of batch sizes.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch gaps. Everything a step varies lives in static buffers that the graph reads: token ids,
positions, KV slots, block tables, context lengths, and α (with 1+α). α in a buffer is what lets
one graph serve any mix of α values; captured as a constant, it would be baked in.

Rows past the real batch (up to the bucket size) write their keys and values into a scratch
block that no sequence owns and attend to it alone, so padding never touches live cache.
"""
from __future__ import annotations

import torch

from ..model.layers import StepContext, set_context


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8 if sizes[-1] < 32 else sizes[-1] * 2)
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model, hidden_size: int, dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                 max_blocks_per_seq: int, scratch_block: int, block_size: int):
        self.model = model
        self.scratch_block = scratch_block
        self.block_size = block_size
        n = max_num_seqs
        long = dict(dtype=torch.int64, device=device)
        self.token_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, **long)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, **long)
        self.context_lens = torch.ones(n, **long)
        self.alpha = torch.zeros(n, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, dtype=torch.float32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.sizes = bucket_sizes(max_num_seqs)

    def _context(self, b: int) -> StepContext:
        return StepContext(
            alpha=self.alpha[:b], scale=self.scale[:b], positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b], context_lens=self.context_lens[:b], query_lens=[1] * b,
            max_context_len=self.block_tables.shape[1] * self.block_size,
            seq_index=torch.arange(b, device=self.alpha.device), query_index=torch.zeros(b, dtype=torch.int64, device=self.alpha.device),
            is_decode_only=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool. Each is run
        eagerly first, so Triton's autotuner has chosen its configs before capture."""
        for b in reversed(self.sizes):
            set_context(self._context(b))
            try:
                self.hidden[:b] = self.model(self.token_ids[:b], self.positions[:b])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.hidden[:b] = self.model(self.token_ids[:b], self.positions[:b])
                self.pool = graph.pool()
                self.graphs[b] = graph
            finally:
                set_context(None)
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.sizes[-1]

    def run(self, token_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Replay the smallest bucket that holds the decode step `ctx`; returns the hidden states
        of its real rows."""
        b = token_ids.shape[0]
        bucket = next(s for s in self.sizes if s >= b)
        self.token_ids[:b].copy_(token_ids)
        self.positions[:b].copy_(ctx.positions)
        self.slot_mapping[:b].copy_(ctx.slot_mapping)
        self.block_tables[:b].fill_(self.scratch_block)
        self.block_tables[:b, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        self.context_lens[:b].copy_(ctx.context_lens)
        self.alpha[:b].copy_(ctx.alpha)
        self.scale[:b].copy_(ctx.scale)
        # Padding rows: position 0 in the scratch block, α = 0.
        self.token_ids[b:bucket].zero_()
        self.positions[b:bucket].zero_()
        self.slot_mapping[b:bucket].fill_(self.scratch_block * self.block_size)
        self.block_tables[b:bucket].fill_(self.scratch_block)
        self.context_lens[b:bucket].fill_(1)
        self.alpha[b:bucket].zero_()
        self.scale[b:bucket].fill_(1.0)
        self.graphs[bucket].replay()
        return self.hidden[:b]
