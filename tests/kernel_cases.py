"""Problems and measures shared by the kernel tests (tests/test_kernels_*.py)."""
from __future__ import annotations

import torch

from expo_kernels import DEFAULT_RANK, EncodedDelta, LowRankDelta, encode_delta

# ‖out − ref‖ / ‖ref‖ allowed per dtype against the float64 reference fed the same numbers, so it
# bounds the kernels' own rounding: fp32 accumulation, plus one rounding of the output (and of a
# merged or dequantized tile) to the dtype, 2^-11 for fp16 and 2^-8 for bf16. Worst seen on the
# interpreted kernels (N = 123, K = 431): 2.1e-7, 2.9e-4 and 6.0e-3; fp32 has room for larger K.
TOLERANCE = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 1.2e-2}

# The α a batch mixes in the tests: SFT (-1), aligned (0), the paper's small and large values.
ALPHAS = (0.3, -1.0, 0.0, 25.0, 2.5, -0.5)


def mixed_alpha(m: int, device=None) -> torch.Tensor:
    """Each row a different α from its neighbours (a decode batch)."""
    return torch.tensor([ALPHAS[i % len(ALPHAS)] for i in range(m)], dtype=torch.float32, device=device)


def spectrum_delta(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A Δ with a fine-tune's long-tailed spectrum (σ_j ~ 1/(j+1)) and |Δ| ~ 1e-2."""
    g = torch.Generator().manual_seed(seed)
    r = min(n, k)
    u = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, r, generator=g))[0]
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    return (u * s) @ v.T * 0.1


def runs_alpha(lengths: list[int], device=None) -> torch.Tensor:
    """Contiguous runs sharing one α each (the prompts of a prefill batch)."""
    return torch.cat([torch.full((n,), ALPHAS[i % len(ALPHAS)], dtype=torch.float32, device=device)
                      for i, n in enumerate(lengths)])


def make_problem(m: int, n: int, k: int, dtype: torch.dtype, encoding: str, *, with_bias: bool = True,
                 seed: int = 0, device=None, **encode_args):
    """x [m, k], W [n, k], an encoded Δ, bias and delta_bias, all in `dtype` on `device` (the
    reference sees exactly these numbers). |Δ| ~ 0.3·|W|, more than a fine-tune moves, so that
    the Δ term stands far above the rounding the tolerances allow."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    delta = torch.randn(n, k, generator=g) / k**0.5 * 0.3
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    delta_bias = torch.randn(n, generator=g) * 0.1 if with_bias else None
    if encoding == "lowrank":  # factors drawn directly: the encoder's SVD is not under test here
        rank = encode_args.get("rank", DEFAULT_RANK)
        a = torch.randn(rank, k, generator=g) / k**0.5
        b = torch.randn(n, rank, generator=g) * 0.3 / rank**0.5
        encoded = LowRankDelta(shape=(n, k), a=a, b=b).to(device=device, dtype=dtype)
    else:
        encoded = encode_delta(delta, encoding, **encode_args).to(device=device, dtype=dtype)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cast(x), cast(w), encoded, cast(bias), cast(delta_bias)


def kernel_args(delta: EncodedDelta) -> tuple[str, list[torch.Tensor], int]:
    """(encoding, parts, group_size): how the kernel wrappers take a delta."""
    return delta.encoding, list(delta.parts().values()), int(getattr(delta, "group_size", 0))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (ref is float64)."""
    out = out.detach().to(ref.device, torch.float64)
    return ((out - ref).norm() / ref.norm()).item()
