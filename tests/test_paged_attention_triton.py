"""The Triton paged decode attention, run by Triton's interpreter, against the torch path
(padded gather + scaled_dot_product_attention), which the engine tests hold to Hugging Face."""
import os

# @triton.jit reads TRITON_INTERPRET when a kernel is defined: set it for this import only, so
# test files collected later keep the torch paths (see tests/test_kernels_triton.py).
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from expo_kernels.paged_attention import _paged_decode_kernel, paged_decode_attention
    from triton.runtime.interpreter import InterpretedFunction
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

import pytest
import torch

from expo_serve.model.layers import StepContext, set_context
from expo_serve.model.llama import PagedAttention

if not isinstance(_paged_decode_kernel, InterpretedFunction):
    pytest.skip("triton was imported for a GPU earlier in this process, so it cannot interpret; "
                "run this file in a process of its own", allow_module_level=True)


def _decode_context(context_lens, block_tables):
    n = len(context_lens)
    lens = torch.tensor(context_lens)
    return StepContext(
        alpha=torch.zeros(n), scale=torch.ones(n), positions=lens - 1, slot_mapping=torch.zeros(n, dtype=torch.long),
        block_tables=block_tables, context_lens=lens, query_lens=[1] * n, max_context_len=max(context_lens),
        seq_index=torch.arange(n), query_index=torch.zeros(n, dtype=torch.long), is_decode_only=True)


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,dtype", [
    (9, 3, 64, None, torch.float32),   # SmolLM2's grouping
    (8, 2, 24, 5, torch.float32),      # a sliding window and a head size that is not a power of two
    (4, 4, 32, None, torch.bfloat16),  # no grouping, bf16 cache
])
def test_kernel_matches_torch_path(heads, kv_heads, head_dim, window, dtype, monkeypatch):
    torch.manual_seed(0)
    block_size, num_blocks = 8, 40
    context_lens = [1, 7, 8, 9, 30, 45]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    perm = torch.randperm(num_blocks).tolist()  # blocks scattered through the cache, as in service
    tables, start = [], 0
    for n in context_lens:
        count = -(-n // block_size)
        tables.append(perm[start:start + count] + [0] * (6 - count))
        start += count
    block_tables = torch.tensor(tables)
    q = torch.randn(len(context_lens), heads, head_dim).to(dtype)
    scale = head_dim ** -0.5

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton also reads it lazily, at a kernel's first call
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(context_lens), scale, window)

    monkeypatch.delenv("TRITON_INTERPRET")  # the layer's own dispatch must now take the torch path
    attn = PagedAttention(heads, kv_heads, head_dim, scale, window)
    attn.k_cache, attn.v_cache = k_cache.clone(), v_cache.clone()
    try:
        # Rewrite each sequence's last key/value with what is already there, then attend (torch path).
        flat_k = k_cache.view(-1, kv_heads, head_dim)
        slots = torch.tensor([tables[i][(n - 1) // block_size] * block_size + (n - 1) % block_size for i, n in enumerate(context_lens)])
        attn_ctx = _decode_context(context_lens, block_tables)
        attn_ctx.slot_mapping = slots
        set_context(attn_ctx)
        expected = attn(q, flat_k[slots], v_cache.view(-1, kv_heads, head_dim)[slots]).view_as(q)
    finally:
        set_context(None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.float() - expected.float()).norm() / expected.float().norm()
    assert err < tol, float(err)
