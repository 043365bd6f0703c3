"""Rotary embeddings and attention over the paged KV cache.

The cache of one layer is [num_blocks, block_size, kv_heads, head_dim] for keys and for values.
Each step writes the new rows' keys and values into their slots, then every sequence attends to
its own blocks. The attention gathers each sequence's blocks into a padded batch and runs one
scaled-dot-product attention with a mask that is causal, bounded by the sequence's length and,
for sliding-window layers, by the window. Prefill, chunked prefill and decode rows share that one
path, so a batch may mix them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .context import get_context


def rope_inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) exactly as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = head_dim_of(config)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported (its frequencies change with the sequence length)")
    return ROPE_INIT_FUNCTIONS[rope_type](config)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once."""

    def __init__(self, config, max_positions: int, device):
        super().__init__()
        inv_freq, scaling = rope_inverse_frequencies(config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, Hkv, D] rotated at their positions."""
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _triton_attention(device: torch.device) -> bool:
    """Decode reads blocks in place with the Triton kernel on CUDA (and under the interpreter)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window = window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new rows; returns [T, H·D]."""
        ctx = get_context()
        flat_k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, ctx.slot_mapping, k)
        flat_v.index_copy_(0, ctx.slot_mapping, v)

        if ctx.is_decode_only and _triton_attention(q.device):
            from expo_kernels.paged_attention import paged_decode_attention

            out = paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale, self.window)
            return out.reshape(out.shape[0], self.num_heads * self.head_dim)
        num_seqs, max_q, max_k = ctx.num_seqs, ctx.max_query_len, ctx.max_context_len
        keys = self.k_cache[ctx.block_tables].flatten(1, 2)[:, :max_k]  # [B, max_k, Hkv, D]
        values = self.v_cache[ctx.block_tables].flatten(1, 2)[:, :max_k]
        if ctx.is_decode_only:
            queries = q.unsqueeze(1)  # one row per sequence, in order
        else:
            queries = q.new_zeros(num_seqs, max_q, self.num_heads, self.head_dim)
            queries[ctx.seq_index, ctx.query_index] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=ctx.attention_mask(self.window),
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # [B, max_q, H, D]
        rows = out.squeeze(1) if ctx.is_decode_only else out[ctx.seq_index, ctx.query_index]
        return rows.reshape(rows.shape[0], self.num_heads * self.head_dim)
