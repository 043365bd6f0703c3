"""Concatenating encoded deltas along the output dimension, for fused q/k/v and gate/up.

Every encoding keeps its rows independent (per-row or per-row-group scales), so row blocks
concatenate part by part. Low-rank factors concatenate as A stacked and B block-diagonal: the
fused Δ is exactly [B_q·A_q; B_k·A_k; B_v·A_v], of rank R_q + R_k + R_v. A `zero` member becomes
the zero of its neighbours' encoding; mixed encodings fall back to dense.
"""
from __future__ import annotations

import torch

from expo_kernels import (
    BitDelta,
    DenseDelta,
    EncodedDelta,
    Int4Delta,
    Int8Delta,
    LowRankDelta,
    ZeroDelta,
)


def concat_rows(deltas: list[EncodedDelta], dense_dtype: torch.dtype) -> EncodedDelta:
    """One encoded Δ whose rows are those of `deltas`, in order."""
    rows = sum(d.shape[0] for d in deltas)
    shape = (rows, *deltas[0].shape[1:])
    kinds = {d.encoding for d in deltas} - {"zero"}
    if not kinds:
        return ZeroDelta(shape=shape)
    if len(kinds) > 1 or len(shape) == 1:
        return _dense(deltas, shape, dense_dtype)
    kind = kinds.pop()
    if kind == "dense":
        return _dense(deltas, shape, next(d.delta.dtype for d in deltas if d.encoding == "dense"))
    if kind == "lowrank":
        return _lowrank(deltas, shape)
    template = next(d for d in deltas if d.encoding != "zero")
    parts = {name: [] for name in template.parts()}
    for d in deltas:
        member = d if d.encoding != "zero" else _zero_like(template, d.shape[0])
        for name, tensor in member.parts().items():
            parts[name].append(tensor)
    joined = {name: torch.cat(tensors, dim=0) for name, tensors in parts.items()}
    if kind == "int4":
        if any(d.encoding == "int4" and d.group_size != template.group_size for d in deltas):
            return _dense(deltas, shape, dense_dtype)
        return Int4Delta(shape=shape, group_size=template.group_size, **joined)
    return type(template)(shape=shape, **joined)


def _dense(deltas, shape, dtype) -> DenseDelta:
    return DenseDelta(shape=shape, delta=torch.cat([d.dequantize(dtype) for d in deltas], dim=0))


def _lowrank(deltas, shape) -> LowRankDelta:
    members = [d for d in deltas if d.encoding == "lowrank"]
    dtype, device = members[0].a.dtype, members[0].a.device
    rank = sum(d.rank for d in members)
    a = torch.cat([d.a for d in members], dim=0)
    b = torch.zeros((shape[0], rank), dtype=dtype, device=device)
    row = col = 0
    for d in deltas:
        if d.encoding == "lowrank":
            b[row:row + d.shape[0], col:col + d.rank] = d.b
            col += d.rank
        row += d.shape[0]
    return LowRankDelta(shape=shape, a=a, b=b)


def _zero_like(template: EncodedDelta, rows: int) -> EncodedDelta:
    """The all-zero Δ of `rows` rows in the template's encoding (scales of 0 decode to 0)."""
    k = template.shape[1]
    zeros = lambda like: torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)  # noqa: E731
    if isinstance(template, Int8Delta):
        return Int8Delta(shape=(rows, k), q=zeros(template.q), scale=zeros(template.scale))
    if isinstance(template, Int4Delta):
        packed = torch.full((rows, template.packed.shape[1]), 0x88, dtype=torch.uint8, device=template.packed.device)
        return Int4Delta(shape=(rows, k), packed=packed, scale=zeros(template.scale), group_size=template.group_size)
    if isinstance(template, BitDelta):
        return BitDelta(shape=(rows, k), packed=zeros(template.packed), scale=zeros(template.scale))
    raise TypeError(f"no zero form for {template.encoding}")
