"""expo_linear: y[i] = x[i]·Wᵀ + (1+α[i])·x[i]·Δᵀ (+ bias + (1+α[i])·delta_bias), α per row.

Which code runs (backend="auto"):
- CUDA tensors: the Triton kernels, chosen by the number of rows M. Up to DECODE_MAX_M rows the
  two-accumulator kernel (triton_decode: memory-bound, W and Δ read once whatever the α mix);
  above, the merged-tile GEMM (triton_prefill: compute-bound, one product per α).
- CPU tensors with TRITON_INTERPRET=1 in the environment: the same Triton kernels, interpreted
  (slow; it is how the kernels are tested without a GPU).
- CPU tensors otherwise: the torch path (torch_path), fast on a CPU.
backend="torch" | "triton" | "decode" | "prefill" forces one ("triton" still picks by M).

The work is registered as the custom op `expo::linear` (with a fake implementation), so torch.compile
traces it as one opaque node. Nothing in it reads the device on the host: α is read from a device
tensor by the kernels, and launches depend on shapes only, so a step can be captured in a CUDA
graph (autotuning must have run first, on a warm-up call).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .encode import EncodedDelta
from .torch_path import dense_delta, torch_linear

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
    row_order: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x·Wᵀ + (1+α)·x·Δᵀ (+ bias + (1+α)·delta_bias), with α chosen per row.

    x [..., K] (float32, bfloat16 or float16); weight [N, K] of x's dtype; delta an EncodedDelta
    of shape [N, K] (a ZeroDelta makes this a plain linear); alpha_rows float32 of shape
    x.shape[:-1] (or [M] for the flattened rows) on x's device, or one number for every row (a
    convenience that builds a tensor, so not for CUDA graphs); bias and delta_bias [N] or None
    (delta_bias may also be the 1-D EncodedDelta of the bias). Returns [..., N] in x's dtype, computed
    with fp32 accumulation.

    row_order: optional permutation of the M rows (int32/int64, x's device) that groups rows of
    equal α, for the prefill kernel; see triton_prefill.alpha_row_order. Ignored elsewhere.
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
    if path == "torch" and encoding in ("int8", "int4", "bit") and x2.is_cpu:
        # The CPU has no fast product on packed codes: decode once and keep it (torch_path).
        encoding, parts, group_size = "dense", [dense_delta(delta, x.dtype)], 0
    else:
        parts, group_size = list(delta.parts().values()), int(getattr(delta, "group_size", 0))
    if encoding == "zero":
        path = "torch"  # a plain linear on every device: cuBLAS, MKL

    args = (x2, weight, encoding, parts, group_size, alpha, bias, delta_bias, row_order, path)
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


def _run(x, weight, encoding, parts, group_size, alpha, bias, delta_bias, row_order, path) -> torch.Tensor:
    if path == "torch":
        return torch_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias)
    if path == "decode":
        from .triton_decode import decode_linear

        return decode_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias)
    from .triton_prefill import prefill_linear

    return prefill_linear(x, weight, encoding, parts, group_size, alpha, bias, delta_bias, row_order=row_order)


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
    row_order: Optional[torch.Tensor],
    path: str,
) -> torch.Tensor:
    """expo_linear on flattened rows, with Δ as its encoding, stored parts and int4 group size;
    `path` is "torch", "decode" or "prefill". Returns a new [M, N] tensor of x's dtype."""
    return _run(x, weight, encoding, parts, group_size, alpha_rows, bias, delta_bias, row_order, path)


@expo_linear_op.register_fake
def _(x, weight, encoding, parts, group_size, alpha_rows, bias, delta_bias, row_order, path):
    return x.new_empty((x.shape[0], weight.shape[0]))
