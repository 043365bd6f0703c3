"""What the two Triton kernels share: how a delta's stored parts reach a kernel, the dot product
for each dtype, and the decoding of a tile of quantized codes in registers.

Both kernels compute the transposed tile, out[m, n] for a [BLOCK_N, BLOCK_M] block, as
(weight tile [BLOCK_N, BLOCK_K]) @ (x tile transposed, [BLOCK_K, BLOCK_M]). The weight side is then
the MMA's A operand, which Hopper's wgmma may take straight from registers, so a tile decoded or
merged in registers does not have to round-trip through shared memory; and at decode sizes the
batch (M <= 64) lands on the instruction's narrow N side instead of being padded up to 64 rows.

Importing this module imports Triton; `expo_kernels` does so only when a Triton path runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_compat import fix_interpreter_index

# @triton.jit decides between compiling and interpreting when a kernel is defined, that is when
# this module and the kernel modules are imported, so this is read once, at the same moment.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETING:
    fix_interpreter_index()  # Triton 3.6's interpreter vs NumPy >= 2.4, see triton_compat

# Stored encodings the kernels decode (zero never reaches a kernel: it is a plain linear).
KERNEL_ENCODINGS = ("dense", "int8", "int4", "bit", "lowrank")


def device_fn(fn):
    """@triton.jit for the helpers the kernels call. The interpreter re-patches triton.language on
    every call of a jitted helper (about 2 ms a call, most of an interpreted kernel's time), so
    there a helper stays the plain Python function it is: the same tl operations, run inline."""
    return fn if INTERPRETING else triton.jit(fn)


def dot_mode(dtype: torch.dtype) -> str:
    """How `mma` multiplies operands of `dtype`.

    fp32 runs as exact IEEE products ("ieee"), never TF32. bf16 and fp16 use the tensor cores
    ("tc"). The interpreter computes a dot with numpy, which has no bf16 and multiplies the raw
    bits as integers, so there bf16 operands are widened to fp32 first ("emulate"): exact, since
    bf16 -> fp32 is lossless and the tensor cores accumulate bf16 products in fp32 too.
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and INTERPRETING:
        return "emulate"
    return "tc"


@device_fn
def mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation, in the precision `dot_mode` chose."""
    if DOT == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "emulate":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@device_fn
def load_codes(d0_ptr, offs_n, offs_k, stride_n, stride_k, mask, DELTA: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of what Δ stores at rows offs_n and columns offs_k, decoded to
    numbers but not yet scaled: dense -> Δ itself (its dtype); int8 -> q; int4 -> q = nibble - 8;
    bit -> ±1. Codes come back as fp32, which holds them exactly (the conversion to bf16 goes
    through fp32 anyway, and the interpreter gets a direct int -> bf16 cast wrong).

    Packed codes are gathered byte by byte (k // 2 or k // 8): the neighbouring lanes that share a
    byte hit the same cache line, so the traffic from memory is the packed size.
    """
    rows = offs_n[:, None] * stride_n
    if DELTA == "dense" or DELTA == "int8":
        codes = tl.load(d0_ptr + rows + offs_k[None, :] * stride_k, mask=mask, other=0)
        if DELTA == "int8":
            codes = codes.to(tl.float32)
    elif DELTA == "int4":
        # 0x88 holds two zero codes, so masked lanes decode to 0 rather than -8.
        byte = tl.load(d0_ptr + rows + (offs_k[None, :] // 2) * stride_k, mask=mask, other=0x88)
        codes = (((byte.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF) - 8).to(tl.float32)
    else:  # bit; masked lanes decode to -1, harmless because the x they meet is masked to 0
        byte = tl.load(d0_ptr + rows + (offs_k[None, :] // 8) * stride_k, mask=mask, other=0)
        codes = (((byte.to(tl.int32) >> (offs_k[None, :] % 8)) & 1) * 2 - 1).to(tl.float32)
    return codes


@device_fn
def load_group_scales(s_ptr, offs_n, offs_k, stride_n, stride_g, mask, GROUP_SIZE: tl.constexpr):
    """int4 scales for a [BLOCK_N, BLOCK_K] tile that spans several groups along K."""
    return tl.load(s_ptr + offs_n[:, None] * stride_n + (offs_k[None, :] // GROUP_SIZE) * stride_g,
                   mask=mask, other=0.0)


@device_fn
def delta_tile(d0_ptr, d1_ptr, offs_n, offs_k, k0, n_ok, mask, stride_d0a, stride_d0b, stride_d1a, stride_d1b,
               row_scale, coef, DELTA: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """coef·Δ for a [BLOCK_N, BLOCK_K] tile, dequantized in fp32 (row_scale: int8 / bit scales of
    offs_n, loaded once per program). coef rides on the per-row scale where there is one, so the
    multiply is per row, not per element."""
    codes = load_codes(d0_ptr, offs_n, offs_k, stride_d0a, stride_d0b, mask, DELTA)
    if DELTA == "dense":
        tile = codes.to(tl.float32) * coef
    elif DELTA == "int4":
        if GROUP_SIZE % BLOCK_K == 0:  # one group covers the tile: one scale per row
            s = tl.load(d1_ptr + offs_n * stride_d1a + (k0 // GROUP_SIZE) * stride_d1b, mask=n_ok, other=0.0)
            tile = codes * (coef * s)[:, None]
        else:
            tile = codes * (coef * load_group_scales(d1_ptr, offs_n, offs_k, stride_d1a, stride_d1b, mask, GROUP_SIZE))
    else:  # int8, bit
        tile = codes * (coef * row_scale)[:, None]
    return tile


# ---------------------------------------------------------------------------------------------
@dataclass
class DeltaOperands:
    """A delta's stored parts as a kernel takes them: two tensors and their (row, column) strides.

    dense   d0 = delta [N, K]
    int8    d0 = q [N, K],             d1 = scale [N]
    int4    d0 = packed [N, ceil(K/2)], d1 = scale [N, ceil(K/G)]
    bit     d0 = packed [N, ceil(K/8)], d1 = scale [N]
    lowrank d0 = a [R, K],              d1 = b [N, R]
    A missing part is replaced by d0 (never read: the kernel's DELTA switch skips it).
    """

    encoding: str
    d0: torch.Tensor
    d1: torch.Tensor
    d0_strides: tuple[int, int]
    d1_strides: tuple[int, int]
    group_size: int
    rank: int


def delta_operands(encoding: str, parts: list[torch.Tensor], group_size: int,
                   n: int, k: int, device: torch.device) -> DeltaOperands:
    """Check a delta's parts against the layouts of encode.py and the [N, K] weight they go with."""
    if encoding not in KERNEL_ENCODINGS:
        raise ValueError(f"the Triton kernels take a {'/'.join(KERNEL_ENCODINGS)} delta, got {encoding!r}")
    expected = {
        "dense": [(n, k)],
        "int8": [(n, k), (n,)],
        "int4": [(n, (k + 1) // 2), (n, triton.cdiv(k, max(group_size, 1)))],
        "bit": [(n, (k + 7) // 8), (n,)],
        "lowrank": None,
    }[encoding]
    if encoding == "lowrank":
        if len(parts) != 2 or parts[0].dim() != 2 or parts[1].dim() != 2:
            raise ValueError("a lowrank delta has two parts, a [R, K] and b [N, R]")
        rank = parts[0].shape[0]
        expected = [(rank, k), (n, rank)]
    got = [tuple(p.shape) for p in parts]
    if got != expected:
        raise ValueError(f"{encoding} delta parts have shapes {got}; a [{n}, {k}] weight needs {expected}")
    for p in parts:
        if p.device != device:
            raise ValueError(f"delta parts must be on {device}, found one on {p.device}")
    if encoding == "int4" and group_size <= 0:
        raise ValueError(f"int4 group size must be positive, got {group_size}")
    d0 = parts[0]
    d1 = parts[1] if len(parts) > 1 else parts[0]

    def strides(t: torch.Tensor) -> tuple[int, int]:
        return (t.stride(0), t.stride(1) if t.dim() > 1 else 0)

    return DeltaOperands(encoding, d0, d1, strides(d0), strides(d1), group_size,
                         parts[0].shape[0] if encoding == "lowrank" else 0)


def rank_block(rank: int) -> int:
    """The padded rank a lowrank tile uses (tl.dot needs every dimension >= 16 and a power of 2)."""
    return max(16, triton.next_power_of_2(rank))


# Shared memory one program may use on an H100 (227 KiB). The pipeline's buffers are nearly all of
# it: for 16-bit dtypes stages x stage_bytes met or overestimated by up to 12% what the offline
# compiles reported (fp32 takes more, and has its own small configs). On smaller GPUs a config over
# their limit fails to launch, and the autotuner skips it.
SMEM_BUDGET = 227 * 1024


def stage_bytes(named_args: dict, block_m: int, block_n: int, block_k: int, delta: str, r_block: int) -> int:
    """Shared memory one pipeline stage holds: the x, W and Δ tiles. Packed codes are gathered
    a byte per value (see load_codes), so an int4 or bit tile takes a byte per value there."""
    x_bytes = named_args["x_ptr"].element_size()
    w_bytes = named_args["w_ptr"].element_size()
    if delta == "lowrank":
        d_tile = r_block * block_k * named_args["d0_ptr"].element_size()
    else:
        d_tile = block_n * block_k * (named_args["d0_ptr"].element_size() if delta == "dense" else 1)
    return block_k * block_m * x_bytes + block_n * block_k * w_bytes + d_tile


def check_rows(x: torch.Tensor, weight: torch.Tensor, alpha_rows: torch.Tensor, out: torch.Tensor | None) -> None:
    """x [M, K] and weight [N, K]; α float32 [M]; out, when given, a contiguous [M, N] of x's
    dtype; all on x's device."""
    (m, k), n = x.shape, weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.device != x.device:
        raise ValueError(f"weight must be [N, {k}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    if alpha_rows.shape != (m,) or alpha_rows.dtype != torch.float32 or alpha_rows.device != x.device:
        raise ValueError(f"alpha_rows must be float32 [{m}] on {x.device}, got {alpha_rows.dtype} "
                         f"{tuple(alpha_rows.shape)} on {alpha_rows.device}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} [{m}, {n}] on {x.device}")


def check_interpretable(*tensors: torch.Tensor) -> None:
    """Compiled kernels cannot touch CPU memory; say how to get the interpreter instead."""
    if not INTERPRETING and any(t.device.type == "cpu" for t in tensors):
        raise RuntimeError(
            "the Triton kernels were compiled for a GPU, so they cannot run on CPU tensors; set "
            "TRITON_INTERPRET=1 before expo_kernels' Triton modules are first imported to interpret them")


def scratch(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer; NaN-filled under the interpreter, so the tests see any element
    that a kernel forgets to write."""
    if INTERPRETING:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_offsets(*tensors: torch.Tensor) -> None:
    """The kernels index with int32 offsets; refuse tensors too large for them."""
    for t in tensors:
        if t is not None and t.numel() and sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} is too large for the int32 offsets of the kernels")
