"""Float64 reference for expo_linear: the formula itself, with nothing fused, cached or rounded.

y[i] = x[i]·Wᵀ + (1+α[i])·x[i]·Δᵀ + bias + (1+α[i])·delta_bias, with Δ from the encoding's own
reference decode (`EncodedDelta.dequantize`), everything in float64 on the CPU.
"""
from __future__ import annotations

import torch

from .encode import EncodedDelta


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: EncodedDelta,
    alpha_rows: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact result in float64 on the CPU. x may be [..., K]; alpha_rows a number, or of shape
    x.shape[:-1] or [M] (the flattened rows)."""
    f64 = torch.float64
    n, k = weight.shape
    lead = x.shape[:-1]
    x64 = x.detach().reshape(-1, k).to("cpu", f64)
    alpha = torch.as_tensor(alpha_rows).detach().to("cpu", f64)
    coef = 1.0 + (alpha.expand(lead) if alpha.dim() == 0 else alpha).reshape(-1, 1)
    delta64 = delta.to("cpu").dequantize(f64)
    y = x64 @ weight.detach().to("cpu", f64).T + coef * (x64 @ delta64.T)
    if bias is not None:
        y = y + bias.detach().to("cpu", f64)
    if delta_bias is not None:
        y = y + coef * delta_bias.detach().to("cpu", f64)
    return y.reshape(*lead, n)
