"""Small-M ("decode") kernel: y = x·Wᵀ + (1+α[row])·x·Δᵀ (+ bias + (1+α[row])·delta_bias).

At decode sizes a linear layer is memory-bound: the time is the bytes of W and of the encoded Δ.
So one pass over both feeds two fp32 accumulators, acc_W = x·Wᵀ and acc_Δ = x·Δᵀ, and the
epilogue returns acc_W + (1+α[row])·acc_Δ. W and Δ are read once for every row of the batch,
whatever mix of α the rows carry: per-request α costs no bytes. int8, int4 and bit codes are
decoded in registers, never in memory, and multiplied as exact small integers, their scales applied
to the accumulator: per row of Δ in the epilogue, or per K tile when an int4 group covers the whole
tile. (A tile that spans several int4 groups is scaled before its product, in fp32, and rounded to
the compute dtype once.)

lowrank Δ = b·a: acc_Δ = (x·aᵀ)·bᵀ. The program computes its own t = x·aᵀ over its K range (the
a tile rides along with the W tile), then t·bᵀ in the epilogue: one launch, no intermediate in
memory. (Recomputing t per N tile costs R/BLOCK_N extra reads of a from L2, cheap at decode sizes;
the prefill kernel computes t once instead.)

When the N tiles alone cannot fill the GPU (a 4096x1024 layer gives 16 tiles of 64 rows on a
132-SM H100), K is split across programs that write fp32 partials, and a small kernel sums them in
a fixed order, adds the biases and casts: deterministic, and no atomics. The split is a host
decision from the shapes alone, so the launch never reads the device.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRETING,
    SMEM_BUDGET,
    check_interpretable,
    check_offsets,
    check_rows,
    delta_operands,
    dot_mode,
    load_codes,
    load_group_scales,
    mma,
    rank_block,
    scratch,
    stage_bytes,
)

# Autotuned on the GPU; BLOCK_M, BLOCK_N and SPLIT_K are fixed by the host (they decide the grid).
# (BLOCK_K, num_warps, num_stages): the kernel is a stream of weight tiles, so the choice is how many
# bytes stay in flight. Each compiles for sm_90 without spills at BLOCK_M = 16 and 64 (checked
# offline: python bench/compile_report.py --all; 256-wide int4 tiles spill with 4 warps).
# Kept short: every config is a compile per encoding and BLOCK_M at first use.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in [(64, 4, 4), (128, 4, 3), (128, 4, 4), (128, 8, 4), (256, 8, 3)]
]
# fp32 runs exact IEEE products on the CUDA cores, whose operands live in registers: small tiles, or
# they spill by kilobytes and outgrow shared memory. (fp32 is a correctness path on a GPU.)
_FP32_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=4, num_stages=s) for bk, s in [(32, 3), (64, 2)]]
# The interpreter runs one program after another in numpy: one small config, no tuning.
INTERPRET_CONFIG = {"BLOCK_K": 128, "num_warps": 4, "num_stages": 1}


def _prune(configs, named_args, **kwargs):
    """The configs of x's dtype whose pipeline fits in shared memory at this BLOCK_M."""
    fp32 = named_args["x_ptr"].dtype == torch.float32
    mine = [c for c in configs if (c in _FP32_CONFIGS) == fp32]
    fits = [c for c in mine if c.num_stages * stage_bytes(
        named_args, kwargs["BLOCK_M"], kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], kwargs["DELTA"],
        kwargs["R_BLOCK"]) <= SMEM_BUDGET]
    return fits or mine[:1]


# M changes every step: specialising on it (M == 1, M % 16 == 0) would compile again mid-serving.
@triton.jit(do_not_specialize=["M"])
def _expo_decode_kernel(
    # tensors
    x_ptr, w_ptr, d0_ptr, d1_ptr, alpha_ptr, bias_ptr, dbias_ptr, out_ptr,
    # sizes: x [M, K], weight [N, K], lowrank rank R (else unused)
    M, N, K, R,
    # strides, in elements
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_d0a, stride_d0b,  # Δ's first part (rows, columns), see DeltaOperands
    stride_d1a, stride_d1b,  # its second part
    stride_os, stride_om, stride_on,  # out [M, N], or the fp32 partials [SPLIT_K, M, N]
    # the delta
    DELTA: tl.constexpr,  # "dense" | "int8" | "int4" | "bit" | "lowrank"
    GROUP_SIZE: tl.constexpr,  # int4 group along K
    R_BLOCK: tl.constexpr,  # lowrank rank padded to a power of 2 >= 16
    # epilogue
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr,
    # tiling
    SPLIT_K: tl.constexpr,
    DOT: tl.constexpr,  # see triton_common.dot_mode
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K); the program holds out[m, n] transposed
    in [BLOCK_N, BLOCK_M] accumulators. The M tiles vary fastest, so programs that share a weight
    tile run side by side and the second read of it comes from L2."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    DT = x_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    # This split's K range, in whole BLOCK_K tiles so that no tile straddles two splits (and an
    # int4 tile inside one group stays inside it).
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_s * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)

    acc_w = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if DELTA == "lowrank":
        offs_r = tl.arange(0, R_BLOCK)
        r_ok = offs_r < R
        t = tl.zeros([R_BLOCK, BLOCK_M], dtype=tl.float32)  # (x·aᵀ)ᵀ over this split's K range

    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        # Masked x columns are 0, which also neutralises whatever a masked weight lane holds.
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        tile_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=tile_ok, other=0.0)
        acc_w = mma(w.to(DT), xt, acc_w, DOT)
        if DELTA == "lowrank":
            a = tl.load(d0_ptr + offs_r[:, None] * stride_d0a + offs_k[None, :] * stride_d0b,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            t = mma(a.to(DT), xt, t, DOT)
        else:
            codes = load_codes(d0_ptr, offs_n, offs_k, stride_d0a, stride_d0b, tile_ok, DELTA)
            if DELTA == "int4":
                if GROUP_SIZE % BLOCK_K == 0:
                    # One group covers the tile: an exact integer product, then one scale per row.
                    s = tl.load(d1_ptr + offs_n * stride_d1a + (k0 // GROUP_SIZE) * stride_d1b, mask=n_ok, other=0.0)
                    part = mma(codes.to(DT), xt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT)
                    acc_d += part * s[:, None]
                else:
                    s = load_group_scales(d1_ptr, offs_n, offs_k, stride_d1a, stride_d1b, tile_ok, GROUP_SIZE)
                    acc_d = mma((codes.to(tl.float32) * s).to(DT), xt, acc_d, DOT)
            else:
                # dense values, or int8 / ±1 codes (exact in bf16 and fp16) scaled in the epilogue
                acc_d = mma(codes.to(DT), xt, acc_d, DOT)

    # Epilogue: acc_W + (1+α)·(acc_Δ [+ delta_bias]) [+ bias].
    if DELTA == "lowrank":
        b = tl.load(d1_ptr + offs_n[:, None] * stride_d1a + offs_r[None, :] * stride_d1b,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc_d = mma(b.to(DT), t.to(DT), acc_d, DOT)
    if DELTA == "int8" or DELTA == "bit":
        s = tl.load(d1_ptr + offs_n * stride_d1a, mask=n_ok, other=0.0)
        acc_d = acc_d * s[:, None]
    if HAS_DBIAS:
        acc_d += tl.load(dbias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    coef = 1.0 + tl.load(alpha_ptr + offs_m, mask=m_ok, other=0.0)
    acc = acc_w + acc_d * coef[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


_expo_decode_tuned = triton.autotune(
    configs=_GPU_CONFIGS + _FP32_CONFIGS,
    key=["N", "K", "DELTA", "GROUP_SIZE", "R_BLOCK", "SPLIT_K", "BLOCK_M", "BLOCK_N"],
    prune_configs_by={"early_config_prune": _prune},
    # Tuning runs once per shape before any CUDA graph is captured; short runs keep start-up quick.
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)(_expo_decode_kernel)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(
    part_ptr, alpha_ptr, bias_ptr, dbias_ptr, out_ptr,
    M, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = Σ_s partials[s] + bias + (1+α[row])·delta_bias, summed in a fixed order.
    partials [SPLIT_K, M, N] fp32 and out [M, N] are contiguous; grid cdiv(M·N, BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    if HAS_DBIAS:
        coef = 1.0 + tl.load(alpha_ptr + offs // N, mask=ok, other=0.0)
        acc += coef * tl.load(dbias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split_k(programs: int, k: int, device: torch.device) -> int:
    """Split K until about two programs per SM exist, keeping >= 512 columns per split."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), k // 512, 16))


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    encoding: str,
    parts: list[torch.Tensor],
    group_size: int,
    alpha_rows: torch.Tensor,
    bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = x·Wᵀ + (1+α)·x·Δᵀ (+ biases) with the two-accumulator kernel.

    x [M, K]; weight [N, K]; Δ given by its encoding, stored parts and int4 group size (see
    encode.py); alpha_rows [M] float32; bias, delta_bias [N] or None. `out` (contiguous [M, N], x's
    dtype) receives the result. `block_n`, `split_k` and `config` ({"BLOCK_K", "num_warps",
    "num_stages"}) override the defaults, for tests and benchmarks; without `config` the GPU
    autotunes. Never synchronises with the device.
    """
    m, k = x.shape
    n = weight.shape[0]
    ops = delta_operands(encoding, parts, group_size, n, k, x.device)
    check_rows(x, weight, alpha_rows, out)
    check_interpretable(x)
    check_offsets(x, weight, ops.d0, ops.d1)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # no products: only the biases remain
        return bias_only(out, alpha_rows, bias, delta_bias)

    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = block_n or 64
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    split_k = split_k or default_split_k(m_tiles * n_tiles, k, x.device)
    target = out if split_k == 1 else scratch((split_k, m, n), torch.float32, x.device)
    dummy = alpha_rows  # stands in for absent optional tensors; never read
    args = (
        x, weight, ops.d0, ops.d1, alpha_rows,
        bias if bias is not None else dummy, delta_bias if delta_bias is not None else dummy, target,
        m, n, k, ops.rank,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        *ops.d0_strides, *ops.d1_strides,
        target.stride(0) if split_k > 1 else 0, target.stride(-2), target.stride(-1),
    )
    meta = dict(
        DELTA=encoding,
        GROUP_SIZE=group_size if encoding == "int4" else 0,
        R_BLOCK=rank_block(ops.rank) if encoding == "lowrank" else 16,
        HAS_BIAS=split_k == 1 and bias is not None,
        HAS_DBIAS=split_k == 1 and delta_bias is not None,
        SPLIT_K=split_k, DOT=dot_mode(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    grid = (m_tiles, n_tiles, split_k)
    if config is None and not INTERPRETING:
        _expo_decode_tuned[grid](*args, **meta)
    else:
        _expo_decode_kernel[grid](*args, **meta, **(config or INTERPRET_CONFIG))

    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, alpha_rows, bias if bias is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, m, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, HAS_DBIAS=delta_bias is not None, BLOCK=block,
        )
    return out


def bias_only(out, alpha_rows, bias, delta_bias):
    """The result when K = 0: no products, only bias + (1+α)·delta_bias."""
    y = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    if bias is not None:
        y += bias.float()
    if delta_bias is not None:
        y += (1.0 + alpha_rows)[:, None] * delta_bias.float()
    return out.copy_(y)
