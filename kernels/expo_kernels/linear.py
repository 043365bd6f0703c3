"""expo_linear: y[i] = x[i]·Wᵀ + (1+α[i])·x[i]·Δᵀ (+ bias + (1+α[i])·delta_bias), α per row.

Which code runs (backend="auto"):
- CUDA tensors: the Triton kernels, chosen by the number of rows M. Up to DECODE_MAX_M rows the
  two-accumulator kernel (triton_decode: memory-bound, W and Δ read once whatever the α mix);
  above, the merged-tile GEMM (triton_prefill: compute-bound, one product per α).
- CPU tensors with TRITON_INTERPRET=1 in the environment: the same Triton kernels, interpreted
  (slow; it is how the kernels are tested without a GPU).
- CPU tensors otherwise: the torch path (`torch_linear`, below), fast on a CPU.
backend="torch" | "triton" | "decode" | "prefill" forces one ("triton" still picks by M).

The work is registered as the custom op `expo::linear` (with a fake implementation), so torch.compile
traces it as one opaque node. Nothing in it reads the device on the host: α is read from a device
tensor by the kernels, and launches depend on shapes only, so a step can be captured in a CUDA
graph (autotuning must have run first, on a warm-up call).

The torch path: plain torch ops, chosen for speed on a CPU.
- Rows whose α is shared by at least MERGE_MIN_ROWS rows (a prompt, an A/B arm at prefill) run as
  ONE product against the merged weight W + (1+α)·Δ, formed for that α: the reference merge
  formula itself, so in float32 the rows match the merged checkpoint. Forming it costs a pass over
  W and Δ, which a product saved over that many rows repays (the merge is memory-bound, the
  product compute-bound).
- The other rows (decode steps, mixed α) run ((1+α)·x)·Δᵀ + x·Wᵀ: the row scaling moves onto x,
  so the second product is the first one's bias, and W and Δ are each read once for all rows.
- lowrank Δ = b·a never becomes dense: (((1+α)·x)·aᵀ)·bᵀ + x·Wᵀ, the same way.
- mixed Δ (low-rank factors in 8/4/2-bit bands) runs as lowrank on its factors, dequantized band by
  band once per compute dtype and kept on the delta (MixedDelta.factors: r·(N + K) values, never
  the dense Δ). The Triton paths take those same factors, so one layout serves decode and prefill
  (bench/NOTES.md, "mixed").
- int8, int4 and bit Δ are decoded once per compute dtype and kept (`dense_delta`), since the CPU
  has no fast product on packed codes. The trade: on a CPU the Δ of an fp32 model costs 4 bytes a
  value in memory, as much as dense, instead of its packed size. The GPU path never does this.
Looking at α to find the shared values reads it on the host, free on a CPU; on a GPU (when the
torch path is forced there) only the two-product form runs, so it never synchronises either.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .encode import EncodedDelta, decoded_once, from_parts

BACKENDS = ("auto", "torch", "triton", "decode", "prefill")
# Up to this many rows the decode kernel's second product is free (its time is the bytes of W and
# Δ) and its cost does not depend on how many α the batch mixes; see bench/NOTES.md.
DECODE_MAX_M = 64


def expo_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: EncodedDelta,
    alpha_rows: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | EncodedDelta | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x·Wᵀ + (1+α)·x·Δᵀ (+ bias + (1+α)·delta_bias), with α chosen per row.

    x [..., K] (float32, bfloat16 or float16); weight [N, K] of x's dtype; delta an EncodedDelta
    of shape [N, K] (a ZeroDelta makes this a plain linear); alpha_rows float32 of shape
    x.shape[:-1] (or [M] for the flattened rows) on x's device, or one number for every row (a
    convenience that builds a tensor, so not for CUDA graphs); bias and delta_bias [N] or None
    (delta_bias may also be the 1-D EncodedDelta of the bias). Returns [..., N] in x's dtype, computed
    with fp32 accumulation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    device = x.device
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != device:
        raise ValueError(f"weight ({weight.dtype} on {weight.device}) must match x ({x.dtype} on {device})")
    if weight.shape != tuple(delta.shape):
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not match weight {tuple(weight.shape)}")
    # At decode sizes on a CPU every µs of Python shows (a 576x576 layer takes ~50 µs), so the
    # common case, 2-D x and [M] float32 α, skips the reshapes and copies.
    n, k = weight.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    alpha = _alpha_rows(alpha_rows, x.shape[:-1], m, device)
    if delta_bias is not None and not isinstance(delta_bias, torch.Tensor):  # an EncodedDelta
        delta_bias = None if delta_bias.encoding == "zero" else delta_bias.dequantize(x.dtype).to(device)
    if bias is not None or delta_bias is not None:
        for name, t in (("bias", bias), ("delta_bias", delta_bias)):
            if t is not None and (t.shape != (n,) or t.device != device):
                raise ValueError(f"{name} must be [{n}] on {device}, got {tuple(t.shape)} on {t.device}")

    path = _resolve(backend, x2, m)
    encoding = delta.encoding
    if encoding == "mixed":
        # Its factor bands, dequantized once per dtype and kept (r·(N + K) values, never Δ), take
        # the lowrank route on every path; a mixed Δ that kept no vector is zero.
        parts = list(delta.factors(x.dtype)) if delta.rank else []
        encoding, group_size = ("lowrank" if parts else "zero"), 0
    elif path == "torch" and encoding in ("int8", "int4", "bit") and x2.is_cpu:
        # The CPU has no fast product on packed codes: decode once and keep it (dense_delta).
        encoding, parts, group_size = "dense", [dense_delta(delta, x.dtype)], 0
    else:
        parts, group_size = list(delta.parts().values()), int(getattr(delta, "group_size", 0))
    if encoding == "zero":
        path = "torch"  # a plain linear on every device: cuBLAS, MKL

    args = (x2, weight, encoding, parts, group_size, alpha, bias, delta_bias, path)
    # Eagerly the op's dispatcher only adds overhead (~200 µs a call measured on the 2-core CPU);
    # torch.compile must see the registered op.
    y = expo_linear_op(*args) if torch.compiler.is_compiling() else _run(*args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _alpha_rows(alpha_rows, lead, m: int, device: torch.device) -> torch.Tensor:
    if not isinstance(alpha_rows, torch.Tensor):
        return torch.full((m,), float(alpha_rows), dtype=torch.float32, device=device)
    if alpha_rows.device != device:
        raise ValueError(f"alpha_rows must be on {device} (copying it would synchronise), got {alpha_rows.device}")
    if alpha_rows.dim() == 1 and alpha_rows.shape[0] == m and alpha_rows.dtype == torch.float32:
        return alpha_rows.contiguous()  # the engine's case, checked first
    if alpha_rows.shape != lead and alpha_rows.shape != (m,):
        raise ValueError(f"alpha_rows must have shape {tuple(lead)} or ({m},), got {tuple(alpha_rows.shape)}")
    return alpha_rows.reshape(m).float().contiguous()


def _resolve(backend: str, x: torch.Tensor, m: int) -> str:
    if backend == "auto":
        interpret = x.is_cpu and os.environ.get("TRITON_INTERPRET") == "1"
        backend = "triton" if x.is_cuda or interpret else "torch"
    if backend == "triton":
        return "decode" if m <= DECODE_MAX_M else "prefill"
    return backend


def _run(x, weight, encoding, parts, group_size, alpha, bias, delta_bias, path) -> torch.Tensor:
    if path == "torch":
        return torch_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias)
    if path == "decode":
        from .triton_decode import decode_linear

        return decode_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias)
    from .triton_prefill import prefill_linear

    return prefill_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias)


@torch.library.custom_op("expo::linear", mutates_args=())
def expo_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    encoding: str,
    parts: list[torch.Tensor],
    group_size: int,
    alpha_rows: torch.Tensor,
    bias: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    path: str,
) -> torch.Tensor:
    """expo_linear on flattened rows, with Δ as its encoding, stored parts and int4 group size;
    `path` is "torch", "decode" or "prefill". Returns a new [M, N] tensor of x's dtype."""
    return _run(x, weight, encoding, parts, group_size, alpha_rows, bias, delta_bias, path)


@expo_linear_op.register_fake
def _(x, weight, encoding, parts, group_size, alpha_rows, bias, delta_bias, path):
    return x.new_empty((x.shape[0], weight.shape[0]))


# The torch path, what runs on a CPU (see the module docstring).

# A merged product replaces two products over the segment's rows but costs a pass over W and Δ.
# On the 2-core dev machine (one thread, a 576x1536 layer) it took 0.4-0.8x the time of two
# products from 32 to 512 rows of one α, and won more as rows grew.
MERGE_MIN_ROWS = 32

# Part names in the order EncodedDelta.parts() lists them, for rebuilding a delta from its parts.
PART_NAMES = {
    "dense": ("delta",),
    "int8": ("q", "scale"),
    "int4": ("packed", "scale"),
    "bit": ("packed", "scale"),
    "lowrank": ("a", "b"),
}

def dense_delta(delta: EncodedDelta, dtype: torch.dtype) -> torch.Tensor:
    """Δ as a dense tensor of `dtype`, decoded on first use and kept while `delta` lives.

    Kept per delta object and re-decoded if one of its parts was modified in place since."""
    if delta.encoding == "dense" and delta.delta.dtype == dtype:
        return delta.delta
    device = next(iter(delta.parts().values())).device
    return decoded_once(delta, "dense", dtype, lambda: delta.dequantize(dtype).to(device).contiguous())


def decode_parts(encoding: str, parts: list[torch.Tensor], group_size: int, shape: tuple[int, int],
                 dtype: torch.dtype) -> torch.Tensor:
    """Dense Δ from stored parts, uncached (for callers that hold only the parts)."""
    params = {"group_size": group_size} if encoding == "int4" else {}
    delta = from_parts(encoding, shape, dict(zip(PART_NAMES[encoding], parts)), params)
    return delta.dequantize(dtype).to(parts[0].device)


# MKL's sgemm at decode sizes slows sharply once W outgrows the caches: on the dev machine (2-core
# EPYC, 8 MiB L3, fp32) a 576→49152 lm_head at M = 16 takes 59 ms in one product and 29 ms as
# 1024-row slices, a 576→3072 gate/up 2.5 ms against 1.8; under 2048 rows slicing gains nothing,
# and a single row (a GEMV) is memory-bound either way (bench/NOTES.md, "slicing wide products").
_SLICE_ROWS = 1024


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed in slices of output rows where that is faster (see _SLICE_ROWS).
    `bias` may be [N] or a full [M, N] addend."""
    n = weight.shape[0]
    if x.device.type != "cpu" or n <= 2 * _SLICE_ROWS or x.shape[0] < 2:
        return F.linear(x, weight, bias)
    pieces = [F.linear(x, weight[i:i + _SLICE_ROWS], None if bias is None else bias[..., i:i + _SLICE_ROWS])
              for i in range(0, n, _SLICE_ROWS)]
    return torch.cat(pieces, dim=-1)


def torch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    encoding: str,
    parts: list[torch.Tensor],
    group_size: int,
    alpha_rows: torch.Tensor,
    bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] for x [M, K], weight [N, K], Δ as encoding + parts, α [M] float32; x's dtype."""
    alpha = alpha_rows if alpha_rows.dtype == torch.float32 else alpha_rows.float()
    if encoding == "zero":
        return _add_delta_bias(_linear(x, weight, bias), alpha, delta_bias)
    if encoding == "lowrank":
        a, b = (p if p.dtype == x.dtype else p.to(x.dtype) for p in parts)
        y = _linear(_linear(_scaled_rows(x, alpha), a), b, _linear(x, weight, bias))  # ((1+α)x·aᵀ)·bᵀ + x·Wᵀ
        return _add_delta_bias(y, alpha, delta_bias)
    if encoding == "dense":
        delta = parts[0] if parts[0].dtype == x.dtype else parts[0].to(x.dtype)
    else:
        delta = decode_parts(encoding, parts, group_size, tuple(weight.shape), x.dtype)
    if x.device.type != "cpu" or x.shape[0] < MERGE_MIN_ROWS:
        return _two_products(x, weight, delta, alpha, bias, delta_bias)
    return _by_shared_alpha(x, weight, delta, alpha, bias, delta_bias)


def _by_shared_alpha(x, weight, delta, alpha, bias, delta_bias):
    """Merged products for the α that enough rows share, two products for the other rows."""
    m = x.shape[0]
    values, inverse, counts = torch.unique(alpha, return_inverse=True, return_counts=True)
    coefs = (1.0 + values).tolist()  # 1 + α in float32, as the kernels form it
    shared = [(i, c) for i, (c, n) in enumerate(zip(coefs, counts.tolist()))
              if n >= MERGE_MIN_ROWS and c - c == 0.0]  # c - c == 0: finite
    if not shared:
        return _two_products(x, weight, delta, alpha, bias, delta_bias)
    if len(shared) == 1 and counts[shared[0][0]] == m:  # one α for the whole batch
        return _merged_product(x, weight, delta, shared[0][1], bias, delta_bias)
    out = torch.empty((m, weight.shape[0]), dtype=x.dtype)
    merged = torch.empty_like(delta)  # one buffer for every segment: a fresh one each is page faults
    rest = torch.ones(m, dtype=torch.bool)
    for i, c in shared:
        rows = _rows(inverse == i)
        out[rows] = _merged_product(x[rows], weight, delta, c, bias, delta_bias, merged)
        rest[rows] = False
    if rest.any():
        rows = _rows(rest)
        out[rows] = _two_products(x[rows], weight, delta, alpha[rows], bias, delta_bias)
    return out


def _rows(mask: torch.Tensor):
    """The rows where mask holds: a slice when they are contiguous (a prompt's rows are), which
    indexes without copying x, else their indices."""
    rows = mask.nonzero().squeeze(1)
    first, last = rows[0].item(), rows[-1].item()
    return slice(first, last + 1) if last - first + 1 == rows.numel() else rows


def _merged_product(x, weight, delta, c: float, bias, delta_bias, merged=None):
    """x·(W + c·Δ)ᵀ + bias + c·delta_bias, merged as expo_serve.delta.merge does (W + Δ·c): in
    float32 the rows get the merged checkpoint's bits. `merged` is an optional buffer for it."""
    merged = torch.mul(delta, c, out=merged) if merged is not None else delta * c
    merged += weight
    b = bias
    if delta_bias is not None:
        b = delta_bias * c if bias is None else bias + delta_bias * c
    return _linear(x, merged, None if b is None else b.to(x.dtype))


def _two_products(x, weight, delta, alpha, bias, delta_bias):
    """((1+α)·x)·Δᵀ + x·Wᵀ: with the row scaling moved onto x, the first product takes the second
    as its bias (one addmm), and the whole is three ops; at decode sizes each op is mostly its
    fixed cost (3-18 µs on the dev machine), so fewer ops is what makes this faster."""
    y = _linear(_scaled_rows(x, alpha), delta, _linear(x, weight, bias))
    return _add_delta_bias(y, alpha, delta_bias)


def _scaled_rows(x, alpha):
    """(1+α[row])·x, as x + α·x in one op in float32; 16-bit x is scaled in fp32, rounded once."""
    if x.dtype == torch.float32:
        return torch.addcmul(x, x, alpha.unsqueeze(1))
    return (x.float() * (1.0 + alpha)[:, None]).to(x.dtype)


def _add_delta_bias(y, alpha, delta_bias):
    """y + (1+α[row])·delta_bias (the term formed in fp32)."""
    if delta_bias is None:
        return y
    if y.dtype == torch.float32:
        return y.addcmul_((1.0 + alpha)[:, None], delta_bias.float()[None, :])
    return y.add_(((1.0 + alpha)[:, None] * delta_bias.float()[None, :]).to(y.dtype))
