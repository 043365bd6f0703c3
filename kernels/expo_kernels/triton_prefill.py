"""Large-M ("prefill") kernel: y = x·(W + (1+α[row])·Δ)ᵀ as ONE matrix product per tile.

At prefill sizes a linear layer is compute-bound, so the decode kernel's two products would double
its time. Instead a program whose rows share one α forms the merged tile W + (1+α)·Δ in registers
(Δ decoded from its codes there, the sum rounded once to the compute dtype, as a merged checkpoint
is) and feeds it to a single tensor-core product: the FLOPs of a plain GEMM.

How rows are grouped by α, without the host ever reading α:
- A program owns a BLOCK_M x BLOCK_N output tile and looks at its own rows' α. If they agree (a
  prompt's rows are contiguous and share α), it runs the merged product. If they do not, it runs
  x·Wᵀ + ((1+α)·x)·Δᵀ, both products into the same accumulator, α moved onto x's columns: twice the
  work, the decode kernel's cost, whatever the mix (so a decode-sized batch of many α routed here
  costs no more than 2x).
- With the batch laid out by request, only the tiles where two requests of different α meet are
  mixed: at most (requests - 1) of the row tiles.
- So there is no segment table, no host sync and no data-dependent grid: a launch can be captured
  in a CUDA graph and replayed with any α.
- A row whose α is not finite takes no part and comes out NaN; the other rows are not affected.

lowrank Δ = b·a (the Punica / S-LoRA shape): t = x·aᵀ once for the whole batch (a skinny GEMM on
cuBLAS, R/N of the main work), then the base GEMM over W alone, whose epilogue adds
((1+α[row])·t)·bᵀ into the same accumulator: one extra K = R product per tile, nothing merged.
"""
from __future__ import annotations

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
    delta_tile,
    mma,
    rank_block,
    stage_bytes,
)
from .triton_decode import bias_only

# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages). BLOCK_N is the MMA's M side (the merged
# weight tile, fed from registers); BLOCK_M the batch side. A merged tile serves BLOCK_M rows, so
# its cost per FLOP falls as BLOCK_M grows: the 256-row tile is there for long prompts. All compile
# for sm_90 without spills for every encoding in 16-bit dtypes, but for lowrank at 128x256 (48 B,
# in the once-per-tile epilogue). Tried and dropped: 64x256 (spills in the two-product form),
# 256x128 and 128x128x128 (spill or overflow shared memory), 4 warps at 128x128 (spills).
# python bench/compile_report.py --all shows them.
_GPU_TILES = [
    (128, 128, 64, 8, 3),
    (128, 256, 32, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 8, 4),
]
# fp32 runs exact IEEE products on the CUDA cores, whose operands live in registers: small tiles, or
# they spill by kilobytes and outgrow shared memory (384 KiB at 128x128x64). fp32 is a correctness
# path on a GPU; these two still spill a few hundred bytes, but fit and run.
_FP32_TILES = [(128, 64, 32, 8, 2), (64, 64, 32, 4, 2)]


def _configs(tiles):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bn, bm, bk, w, s in tiles]


_GPU_CONFIGS = _configs(_GPU_TILES)
_FP32_CONFIGS = _configs(_FP32_TILES)
INTERPRET_CONFIG = {"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def _prune(configs, named_args, **kwargs):
    """The configs of x's dtype, less row tiles far taller than the batch (they only multiply
    padding) and pipelines that would not fit in shared memory."""
    fp32 = named_args["x_ptr"].dtype == torch.float32
    mine = [c for c in configs if (c in _FP32_CONFIGS) == fp32]
    limit = max(64, named_args["m_bucket"])
    keep = [c for c in mine if c.kwargs["BLOCK_M"] <= limit and c.num_stages * stage_bytes(
        named_args, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], kwargs["DELTA"],
        kwargs["R_BLOCK"]) <= SMEM_BUDGET]
    return keep or mine[-1:]


# M changes every step: specialising on it (M == 1, M % 16 == 0) would compile again mid-serving.
@triton.jit(do_not_specialize=["M"])
def _expo_prefill_kernel(
    # tensors
    x_ptr, w_ptr, d0_ptr, d1_ptr, alpha_ptr, bias_ptr, dbias_ptr, out_ptr,
    # sizes: x [M, K], weight [N, K], lowrank rank R; m_bucket only keys the autotuner
    M, N, K, R, m_bucket,
    # strides, in elements
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_d0a, stride_d0b,  # Δ's first part (lowrank: t = x·aᵀ [M, R]), see DeltaOperands
    stride_d1a, stride_d1b,  # its second part
    stride_om, stride_on,
    # the delta
    DELTA: tl.constexpr,  # "dense" | "int8" | "int4" | "bit" | "lowrank"
    GROUP_SIZE: tl.constexpr,  # int4 group along K
    R_BLOCK: tl.constexpr,  # lowrank rank padded to a power of 2 >= 16
    # epilogue
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr,
    DOT: tl.constexpr,  # see triton_common.dot_mode
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), ordered as in tutorial 03 so that GROUP_M row
    tiles sweep the N tiles together and share weight tiles in L2. The program holds out[m, n]
    transposed in a [BLOCK_N, BLOCK_M] accumulator."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    DT = x_ptr.dtype.element_ty

    lane = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + lane
    m_ok = offs_m < M
    alpha = tl.load(alpha_ptr + offs_m, mask=m_ok, other=0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[None, :] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if DELTA == "lowrank":
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x_rows + offs_k[:, None] * stride_xk, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma(w.to(DT), xt, acc, DOT)
        # + b·((1+α)·t)ᵀ into the same accumulator (a second one would spill at 128x256 tiles).
        offs_r = tl.arange(0, R_BLOCK)
        r_ok = offs_r < R
        t = tl.load(d0_ptr + offs_m[None, :] * stride_d0a + offs_r[:, None] * stride_d0b,
                    mask=m_ok[None, :] & r_ok[:, None], other=0.0)
        t = (t.to(tl.float32) * (1.0 + alpha)[None, :]).to(DT)
        b = tl.load(d1_ptr + offs_n[:, None] * stride_d1a + offs_r[None, :] * stride_d1b,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = mma(b.to(DT), t, acc, DOT)
        row_ok = m_ok
    else:
        # α - α is 0 exactly when α is finite; NaN or ±inf rows take no part and come out NaN.
        row_ok = m_ok & ((alpha - alpha) == 0.0)
        lead = tl.min(tl.where(row_ok, lane, BLOCK_M), axis=0)
        alpha_lead = tl.sum(tl.where(lane == lead, alpha, 0.0), axis=0)
        uniform = tl.max((row_ok & (alpha != alpha_lead)).to(tl.int32), axis=0) == 0
        if DELTA == "int8" or DELTA == "bit":
            row_scale = tl.load(d1_ptr + offs_n * stride_d1a, mask=n_ok, other=0.0)
        else:
            row_scale = tl.zeros([BLOCK_N], dtype=tl.float32)  # not read
        if uniform:
            # One α (a prompt's rows): ONE product on the merged tile W + (1+α)·Δ.
            coef = 1.0 + alpha_lead
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xt = tl.load(x_rows + offs_k[:, None] * stride_xk, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
                tile_ok = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=tile_ok, other=0.0)
                d = delta_tile(d0_ptr, d1_ptr, offs_n, offs_k, k0, n_ok, tile_ok, stride_d0a, stride_d0b,
                               stride_d1a, stride_d1b, row_scale, coef, DELTA, GROUP_SIZE, BLOCK_K)
                acc = mma((w.to(tl.float32) + d).to(DT), xt, acc, DOT)
        else:
            # Several α (where requests meet): x·Wᵀ + ((1+α)·x)·Δᵀ, both products into the same
            # accumulator, the α moved onto x's columns. Twice a plain GEMM's work, whatever the mix.
            coef_rows = 1.0 + alpha
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                xt = tl.load(x_rows + offs_k[:, None] * stride_xk, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
                xs = (xt.to(tl.float32) * coef_rows[None, :]).to(DT)
                tile_ok = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=tile_ok, other=0.0)
                d = delta_tile(d0_ptr, d1_ptr, offs_n, offs_k, k0, n_ok, tile_ok, stride_d0a, stride_d0b,
                               stride_d1a, stride_d1b, row_scale, 1.0, DELTA, GROUP_SIZE, BLOCK_K)
                acc = mma(w.to(DT), xt, acc, DOT)
                acc = mma(d.to(DT), xs, acc, DOT)

    if HAS_DBIAS:
        acc += tl.load(dbias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None] * (1.0 + alpha)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.where(row_ok[None, :], acc, float("nan"))
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


_expo_prefill_tuned = triton.autotune(
    configs=_GPU_CONFIGS + _FP32_CONFIGS,
    key=["m_bucket", "N", "K", "DELTA", "GROUP_SIZE", "R_BLOCK"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)(_expo_prefill_kernel)


def prefill_linear(
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
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = x·(W + (1+α)·Δ)ᵀ (+ biases): a merged product per tile of one α, two otherwise.

    Arguments as for triton_decode.decode_linear. `config` holds BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps and num_stages; without it the GPU autotunes.
    Never synchronises with the device.
    """
    m, k = x.shape
    n = weight.shape[0]
    ops = delta_operands(encoding, parts, group_size, n, k, x.device)
    check_rows(x, weight, alpha_rows, out)
    check_interpretable(x)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return bias_only(out, alpha_rows, bias, delta_bias)
    d0, d0_strides = ops.d0, ops.d0_strides
    if encoding == "lowrank":
        # The shrink product, once for the batch.
        d0 = torch.matmul(x, ops.d0.to(x.dtype).t())
        d0_strides = (d0.stride(0), d0.stride(1))
    check_offsets(x, weight, d0, ops.d1, out)

    dummy = alpha_rows  # stands in for absent optional tensors; never read
    args = (
        x, weight, d0, ops.d1, alpha_rows,
        bias if bias is not None else dummy, delta_bias if delta_bias is not None else dummy, out,
        m, n, k, ops.rank, min(4096, max(16, triton.next_power_of_2(m))),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        *d0_strides, *ops.d1_strides, out.stride(0), out.stride(1),
    )
    meta = dict(
        DELTA=encoding,
        GROUP_SIZE=group_size if encoding == "int4" else 0,
        R_BLOCK=rank_block(ops.rank) if encoding == "lowrank" else 16,
        HAS_BIAS=bias is not None, HAS_DBIAS=delta_bias is not None,
        DOT=dot_mode(x.dtype),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is None and not INTERPRETING:
        _expo_prefill_tuned[grid](*args, **meta)
    else:
        config = config or INTERPRET_CONFIG
        _expo_prefill_kernel[grid({**meta, **config})](*args, **meta, **config)
    return out
