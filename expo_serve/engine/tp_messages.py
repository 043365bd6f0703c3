"""What rank 0 sends a tensor-parallel worker each step, as bytes: the step's inputs (StepInputs,
α of every token row included) and the α-cache slots filled or dropped since the last step.

Layout: a tag byte, then one int64 array (its length first, then a header of counts, then every
integer field back to back) and one float64 array (each row's α as the scheduler holds it, so a
worker forms 1+α from the same double; then the α of each filled slot). No pickle: the worker
reads numbers only.
"""
from __future__ import annotations

import numpy as np

from .model_runner import StepInputs

STEP, STOP = b"S", b"X"
NO_SLOT = -1

Event = tuple[int, float | None]  # (slot, α filled) or (slot, None) for a slot dropped


def encode_step(inputs: StepInputs, events: list[Event]) -> bytes:
    groups = inputs.logit_rows
    head = [len(inputs.token_ids), len(inputs.query_lens), len(inputs.tables), len(events), int(inputs.graphable),
            int(inputs.row_slots is not None), int(inputs.rope_lens is not None), len(groups), *(len(g) for g in groups)]
    row_slots = [] if inputs.row_slots is None else [NO_SLOT if s is None else s for s in inputs.row_slots]
    ints = [len(head), *head, *inputs.token_ids, *inputs.positions, *inputs.slots, *inputs.context_lens,
            *inputs.seq_index, *inputs.query_index, *inputs.tables, *inputs.query_lens, *row_slots, *(inputs.rope_lens or []),
            *(slot for slot, _ in events), *(int(alpha is not None) for _, alpha in events), *(r for g in groups for r in g)]
    floats = [*inputs.alphas, *(0.0 if alpha is None else alpha for _, alpha in events)]
    ints_array = np.asarray(ints, dtype=np.int64)
    return STEP + np.int64(ints_array.size).tobytes() + ints_array.tobytes() + np.asarray(floats, dtype=np.float64).tobytes()


def decode_step(message: bytes) -> tuple[StepInputs, list[Event]]:
    if message[:1] != STEP:
        raise ValueError("not a step message")
    count = int(np.frombuffer(message, dtype=np.int64, count=1, offset=1)[0])
    ints = np.frombuffer(message, dtype=np.int64, count=count, offset=9).tolist()
    floats = np.frombuffer(message, dtype=np.float64, offset=9 + 8 * count).tolist()
    head_len = ints[0]
    rows, seqs, tables, num_events, graphable, has_slots, has_rope_lens, num_groups, *group_lens = ints[1:1 + head_len]
    at = 1 + head_len

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return ints[at - n:at]

    token_ids, positions, slots = take(rows), take(rows), take(rows)
    context_lens, seq_index, query_index, block_tables, query_lens = take(seqs), take(rows), take(rows), take(tables), take(seqs)
    row_slots = [None if s == NO_SLOT else s for s in take(rows)] if has_slots else None
    rope_lens = take(seqs) if has_rope_lens else None
    event_slots, filled = take(num_events), take(num_events)
    groups = [take(n) for n in group_lens[:num_groups]]
    alphas, event_alphas = floats[:rows], floats[rows:]
    events = [(slot, alpha if fill else None) for slot, fill, alpha in zip(event_slots, filled, event_alphas)]
    inputs = StepInputs(token_ids, positions, slots, context_lens, seq_index, query_index, block_tables, query_lens, alphas,
                        row_slots, groups, bool(graphable), rope_lens)
    return inputs, events
