"""Runs one step of the model over a scheduled batch: inputs, KV cache, logits.

The KV cache is allocated once: [layers, blocks, block_size, kv_heads, head_dim] for keys and
the same for values, sized from a flag or from the memory left on the device.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from expo_kernels.linear import MERGE_MIN_ROWS

from ..model.layers import StepContext, set_context
from ..model.llama import dynamic_rope_limit, head_dim_of
from ..model.loader import LoadedModel
from .request import TokenLogprob, top_logprobs
from .scheduler import ScheduledSeq


@dataclass
class StepInputs:
    """One step's inputs as host lists: all a rank needs to run the model on it (rank 0 sends
    them to tensor-parallel workers). Row-level fields have one entry per token row, in batch
    order; `tables` holds each sequence's block table padded to the longest."""
    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # flat KV-cache slot of each row
    context_lens: list[int]
    seq_index: list[int]
    query_index: list[int]
    tables: list[int]
    query_lens: list[int]
    alphas: list[float]
    row_slots: list[int | None] | None  # each row's α-cache slot (None: fused), or None for no cached row
    logit_rows: list[list[int]]  # the groups of rows whose logits are computed, in order
    graphable: bool  # a decode step a CUDA graph may run
    # Under dynamic NTK rope, when some sequence is past max_position_embeddings: each sequence's
    # rope length (ModelRunner._rope_lens). None: every row rotates by the table.
    rope_lens: list[int] | None = None


@dataclass
class StepLogits:
    """Logits of the rows whose next token is sampled, in batch order, and their sequences."""
    logits: torch.Tensor  # [R, V] float32
    sampled: list[ScheduledSeq]


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """Bytes of one KV block of `kv_heads` heads (default: all of the model's; a tensor-parallel
    rank holds its own)."""
    per_token = 2 * config.num_hidden_layers * (kv_heads or config.num_key_value_heads) * head_dim_of(config)
    return per_token * block_size * torch.empty(0, dtype=dtype).element_size()


def auto_kv_cache_bytes(device: torch.device) -> int:
    """What the cache may take when no size is given: on a GPU 90% of what the model left free;
    on a CPU a quarter of the available memory, at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(available // 4, 4 * 1024**3))


def product_cost(rows: int) -> float:
    """A CPU product's cost in units of one at MERGE_MIN_ROWS rows: flat below (a product of a few
    rows costs about as much as one of 32: weights and call overhead, not arithmetic), linear above
    (compute-bound). The threshold is the torch path's, measured on the 2-core dev machine."""
    return max(1.0, rows / MERGE_MIN_ROWS)


def merged_is_cheaper(rows: dict[float, int], slots: dict[float, int]) -> bool:
    """One product per cached α group (plus two fused ones for any other rows) against two fused
    products over all rows. A single α, or groups of prefill size, win; three decode-sized
    groups lose (bench/RESULTS.md, issue 12's table)."""
    rest = sum(n for alpha, n in rows.items() if alpha not in slots)
    merged = sum(product_cost(rows[alpha]) for alpha in slots) + (2 * product_cost(rest) if rest else 0.0)
    return merged < 2 * product_cost(sum(rows.values()))


def worth_a_slot(rows: dict[float, int], cached: dict[float, int]) -> list[float]:
    """The α values of this step that may take a free slot: only where the step would then run
    merged, and in a step of several α only for groups smaller than MERGE_MIN_ROWS (the torch path
    merges larger ones on the fly). So slots are filled for steps of one α, where they halve the
    cost of every layer, and not for mixed arms that the rule runs fused anyway: those would hold
    memory for nothing (bench/RESULTS.md, issue 12)."""
    small = [alpha for alpha, n in rows.items()
             if alpha not in cached and (n < MERGE_MIN_ROWS or len(rows) == 1)]
    would_hold = {alpha: 0 for alpha in rows if alpha in cached or alpha in small}
    return small if small and merged_is_cheaper(rows, would_hold) else []


def default_alpha_cache_bytes(device: torch.device, slot_bytes: int) -> int:
    """On a CPU, room for one α's merged weights when that is at most an eighth of the available
    memory: a step of one α (the default α's traffic, or an arm's tail) then costs one product,
    not two, and mixed steps run fused whatever the budget (worth_a_slot), so more slots would
    only hold memory. On CUDA none: decode there is bound by bytes, and a merged copy adds bytes."""
    if device.type == "cuda":
        return 0
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return slot_bytes if slot_bytes <= available // 8 else 0


class ModelRunner:
    def __init__(self, loaded: LoadedModel, block_size: int, num_blocks: int, *, max_num_seqs: int, max_model_len: int,
                 cuda_graphs: bool, alpha_cache_bytes: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        config = loaded.config
        self.dynamic_rope_limit = dynamic_rope_limit(config)
        layers = config.num_hidden_layers
        # One block past the allocator's: the scratch block that CUDA-graph padding rows write to.
        shape = (layers, num_blocks + 1, block_size, self.model.kv_heads, head_dim_of(config))
        self.k_cache = torch.zeros(shape, dtype=loaded.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=loaded.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.k_cache[i]
            layer.self_attn.attn.v_cache = self.v_cache[i]
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, config.hidden_size, loaded.dtype, self.device, max_num_seqs,
                                       -(-max_model_len // block_size), scratch_block=num_blocks, block_size=block_size)
            self.graphs.capture()
        self.alpha_cache = None
        if alpha_cache_bytes > 0 and self.model.has_delta:
            self.alpha_cache = AlphaCache(alpha_cache_bytes, self.model.alpha_slot_bytes, self._fill_slot, self._drop_slot)

    def _fill_slot(self, slot: int, alpha: float) -> None:
        self.model.fill_alpha_slot(slot, alpha)

    def _drop_slot(self, slot: int) -> None:
        self.model.drop_alpha_slot(slot)

    def _by_alpha(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], dict[float, int]]:
        """Which α groups of this step run on merged weights (their slots), and the batch ordered
        so that each such group is one run of rows, the fused rows after. Host values only."""
        if self.alpha_cache is None:
            return batch, {}
        rows: dict[float, int] = {}
        for item in batch:
            rows[item.seq.alpha] = rows.get(item.seq.alpha, 0) + item.num_new_tokens
        slots = self.alpha_cache.plan(rows, admit=worth_a_slot(rows, self.alpha_cache.cached))
        if not slots or not merged_is_cheaper(rows, slots):
            return batch, {}
        return sorted(batch, key=lambda item: (item.seq.alpha not in slots, slots.get(item.seq.alpha, 0))), slots

    def _inputs(self, batch: list[ScheduledSeq], alpha_slots: dict[float, int]):
        """The step's StepInputs, and for rank 0's bookkeeping the prompt rows scored (sequence,
        row, target position) and the items sampled."""
        token_ids, positions, slots, alphas, seq_index, query_index = [], [], [], [], [], []
        sampled_rows, sampled, prompt_rows = [], [], []
        bs = self.block_size
        for b, item in enumerate(batch):
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            offset = len(token_ids)
            if seq.prompt_logprobs is not None:
                # Row at position p predicts token p+1; only prompt tokens are scored, once
                # (a preempted sequence recomputes rows it has already scored).
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                prompt_rows.extend((seq, offset + p - start, p + 1) for p in range(first, last))
            if item.completes:
                sampled_rows.append(offset + n - 1)
                sampled.append(item)
            token_ids.extend(seq.token_ids[start:start + n])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            alphas.extend([seq.alpha] * n)
            seq_index.extend([b] * n)
            query_index.extend(range(n))
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = [t for item in batch for t in item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table))]
        context_lens = [item.seq.num_computed_tokens + item.num_new_tokens for item in batch]
        query_lens = [item.num_new_tokens for item in batch]
        row_slots = [alpha_slots.get(a) for a in alphas] if alpha_slots else None
        scoring = any(item.seq.prompt_logprobs is not None for item in batch)
        logit_rows = [group for group in ([r for _, r, _ in prompt_rows], sampled_rows) if group]
        rope_lens = self._rope_lens(batch, context_lens)
        # CUDA graphs capture the rotary's table path only.
        graphable = all(n == 1 for n in query_lens) and not scoring and row_slots is None and rope_lens is None
        inputs = StepInputs(token_ids, positions, slots, context_lens, seq_index, query_index, tables, query_lens, alphas,
                            row_slots, logit_rows, graphable, rope_lens)
        return inputs, prompt_rows, sampled

    def _rope_lens(self, batch: list[ScheduledSeq], context_lens: list[int]) -> list[int] | None:
        """Under dynamic NTK rope, the length each sequence's rows rotate at: its context after
        this step, or its prompt's length if longer. So every prompt row, in one prefill or in
        chunks, rotates as in one forward over the prompt, and each decode row at position p as in
        transformers' generate (length p+1). None while no sequence is past max_position_embeddings
        (the table serves them all; host values only)."""
        if self.dynamic_rope_limit is None:
            return None
        lens = [max(n, item.seq.num_prompt_tokens) for item, n in zip(batch, context_lens)]
        return lens if max(lens) > self.dynamic_rope_limit else None

    def _context(self, inputs: StepInputs) -> tuple[torch.Tensor, StepContext]:
        # Two host-to-device copies a step, one per dtype, each from pinned memory without waiting;
        # every field is a view of one of the two buffers.
        longs = self._to_device([inputs.token_ids, inputs.positions, inputs.slots, inputs.context_lens, inputs.seq_index,
                                 inputs.query_index, inputs.tables, inputs.rope_lens or []], torch.int64)
        # (1+α) rounded once from double, as the reference merge rounds it.
        floats = self._to_device([inputs.alphas, [1.0 + a for a in inputs.alphas]], torch.float32)
        token_rows, positions_d, slots_d, lens_d, seq_index_d, query_index_d, tables_d, rope_lens_d = longs
        num_seqs = len(inputs.query_lens)
        ctx = StepContext(
            alpha=floats[0],
            scale=floats[1],
            positions=positions_d,
            slot_mapping=slots_d,
            block_tables=tables_d.view(num_seqs, len(inputs.tables) // num_seqs),
            context_lens=lens_d,
            query_lens=inputs.query_lens,
            max_context_len=max(inputs.context_lens),
            seq_index=seq_index_d,
            query_index=query_index_d,
            is_decode_only=all(n == 1 for n in inputs.query_lens),
            row_slots=inputs.row_slots,
            rope_lens=None if inputs.rope_lens is None else rope_lens_d,
        )
        return token_rows, ctx

    def _to_device(self, fields: list[list], dtype: torch.dtype) -> list[torch.Tensor]:
        """The lists as tensors on the device: one buffer, one copy (pinned, non-blocking on CUDA)."""
        flat = torch.tensor([v for values in fields for v in values], dtype=dtype, pin_memory=self.device.type == "cuda")
        flat = flat.to(self.device, non_blocking=True)
        return list(flat.split([len(values) for values in fields]))

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> StepLogits:
        """Run the batch; record prompt logprobs where asked; return the logits to sample from (in
        the order of the returned `sampled`, which may differ from the batch's)."""
        batch, alpha_slots = self._by_alpha(batch)
        inputs, prompt_rows, sampled = self._inputs(batch, alpha_slots)
        logits = self.run(inputs)
        if prompt_rows:
            self._score_prompt(logits[0], prompt_rows)
        if not sampled:
            return StepLogits(torch.empty(0), [])
        return StepLogits(logits[-1], sampled)

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> list[torch.Tensor]:
        """The model over one step's inputs; the logits of each group of `inputs.logit_rows`.
        (Tensor-parallel workers run exactly this on the inputs rank 0 sends them.)"""
        token_ids, ctx = self._context(inputs)
        set_context(ctx)
        try:
            if self.graphs is not None and inputs.graphable and self.graphs.fits(ctx.num_seqs):
                hidden = self.graphs.run(token_ids, ctx)
            else:
                hidden = self.model(token_ids, ctx.positions)
            return [self._logits(hidden, ctx, rows) for rows in inputs.logit_rows]
        finally:
            set_context(None)

    def _logits(self, hidden: torch.Tensor, ctx: StepContext, rows: list[int]) -> torch.Tensor:
        """Logits of some rows, each at its own α: the context of just those rows is published."""
        index = self._to_device([rows], torch.int64)[0]
        set_context(ctx.rows(index, rows))
        return self.model.compute_logits(hidden.index_select(0, index))

    def _score_prompt(self, logits: torch.Tensor, prompt_rows) -> None:
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([seq.token_ids[p] for seq, _, p in prompt_rows], dtype=torch.int64, device=self.device)
        k = max(seq.params.prompt_logprobs for seq, _, _ in prompt_rows)
        scored: list[TokenLogprob] = top_logprobs(log_probs, targets, k)
        for (seq, _, _), lp in zip(prompt_rows, scored):
            lp.top = lp.top[: seq.params.prompt_logprobs]
            seq.prompt_logprobs.append(lp)


# -- the α cache -----------------------------------------------------------------------------------
# Merged weights for the hot α values: per-request α at the cost of a merged checkpoint.
#
# When few α values are live (an A/B test's arms), every linear layer can keep W + (1+α)·Δ for
# each of them, formed in float32 exactly as the reference merge forms it, and run the rows of that
# α as ONE plain product: no second product, no decoding of Δ. Rows of other α values take the
# fused path (x·Wᵀ + (1+α)·x·Δᵀ), as without the cache.
#
# This class is the bookkeeping, on the host: which α holds which slot, least recently used first,
# within a byte budget (every slot costs the bytes of all merged weights, measured from the
# tensors). The model holds the tensors (ExpoForCausalLM.fill_alpha_slot / drop_alpha_slot).
#
# An α gets a slot on demand, when a step's batch would run it merged (`worth_a_slot`: a small
# group in a step the cost rule runs merged) and a slot is free, or when the least
# recently used slot has been idle for `min_idle_steps` steps: with more live α values than slots
# (a sweep), the first ones keep their slots instead of the cache thrashing. Decisions read only
# host values (the scheduler's α per sequence), never a device tensor.


class AlphaCache:
    def __init__(self, budget_bytes: int, slot_bytes: int, fill: Callable[[int, float], None],
                 drop: Callable[[int], None], *, min_idle_steps: int = 64):
        self.slot_bytes = slot_bytes
        self.capacity = int(budget_bytes // slot_bytes) if slot_bytes > 0 else 0
        self._fill, self._drop = fill, drop
        self.min_idle_steps = min_idle_steps
        self._slots: OrderedDict[float, int] = OrderedDict()  # α -> slot, least recently used first
        self._last_used: dict[float, int] = {}
        self._free = list(range(self.capacity))
        self._step = 0
        self.fills = 0
        self.evictions = 0

    @property
    def cached(self) -> dict[float, int]:
        return dict(self._slots)

    @property
    def bytes_held(self) -> int:
        return len(self._slots) * self.slot_bytes

    def plan(self, alphas: Iterable[float], admit: Iterable[float] | None = None) -> dict[float, int]:
        """The slot of every α of this step that has (or now gets) merged weights; only the α in
        `admit` (default: all) may take a slot they do not hold yet."""
        self._step += 1
        live = list(dict.fromkeys(alphas))
        admissible = set(live if admit is None else admit)
        for alpha in live:
            if alpha in self._slots:
                self._touch(alpha)
        for alpha in live:
            if alpha not in self._slots and alpha in admissible and self.capacity:
                self._admit(alpha, live, patient=admit is None)
        return {alpha: self._slots[alpha] for alpha in live if alpha in self._slots}

    def _touch(self, alpha: float) -> None:
        self._slots.move_to_end(alpha)
        self._last_used[alpha] = self._step

    def _admit(self, alpha: float, live: list[float], patient: bool = True) -> None:
        """Give α a slot, evicting the least recently used α that this step does not use. Patient
        (every live α may ask): only a slot idle for min_idle_steps, lest live α values take turns.
        Not patient (the cost rule admitted α: its step runs merged on it, a step of one α): at once,
        since the batch's α mix changes only as sequences finish, so slots cannot take turns."""
        if not self._free:
            victim = next((a for a in self._slots if a not in live), None)
            if victim is None or (patient and self._step - self._last_used[victim] < self.min_idle_steps):
                return  # every slot is in use: this α runs fused
            self._drop(self._slots[victim])
            self._free.append(self._slots.pop(victim))
            del self._last_used[victim]
            self.evictions += 1
        slot = self._free.pop()
        self._fill(slot, alpha)
        self._slots[alpha] = slot
        self._touch(alpha)
        self.fills += 1
