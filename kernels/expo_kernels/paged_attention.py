"""Paged decode attention in Triton: one query row per sequence, keys read in place from blocks.

The torch path gathers every sequence's blocks into a padded copy before attending; at decode
that copy is as large as the reads themselves. This kernel reads each block once, straight from
the cache, with an online softmax. One program serves one sequence and one KV head, so the query
heads of a GQA group share every K/V load. A group has few heads (3 in SmolLM2, 4 in Llama 3 8B),
too few for tensor cores, so the products are broadcast multiply-and-sum; decode attention is
memory-bound either way.

Shapes: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks];
context_lens [B] (the query is the last of them); out [B, H, D].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_compat import fix_interpreter_index

if os.environ.get("TRITON_INTERPRET") == "1":
    fix_interpreter_index()  # Triton 3.6's interpreter vs NumPy >= 2.4, see triton_compat


@triton.jit
def _paged_decode_kernel(
    # tensors
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    # scalars
    scale, window,  # window 0: full attention; else a key at distance ≥ window is unseen
    # strides (elements)
    stride_qb, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_tb,
    stride_ob, stride_oh,
    # shapes
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,  # query heads per KV head, and that padded to 2^k
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    query_pos = context_len - 1

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM_P)
    head_ok = g < GROUP
    dim_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale

    first = tl.where(window > 0, tl.maximum(query_pos - window + 1, 0), 0)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max of the scores
    denom = tl.zeros([GROUP_P], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    s = tl.arange(0, BLOCK_SIZE)
    for b in range(first // BLOCK_SIZE, tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_tb + b).to(tl.int64)
        pos = b * BLOCK_SIZE + s
        seen = (pos < context_len) & (pos >= first)
        kv_offsets = block * stride_cb + s[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        kv_mask = seen[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BLOCK_SIZE]
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        rescale = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        denom = denom * rescale + tl.sum(p, axis=1)
        m = m_new

    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Attention of one query row per sequence over its paged keys and values; returns [B, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share a layout with contiguous head dimensions")
    if block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} must be a power of two")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale, window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_P=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
    )
    return out
