"""The Triton kernels themselves (not the torch path), run by Triton's interpreter on the CPU and
measured against the float64 reference as ‖out − ref‖ / ‖ref‖.

Shapes are odd on purpose (N = 123, K = 431: no block size divides them), α mixes -1, 0, 25 and
more within a batch, and every output starts as NaN, so an element a kernel forgets to write fails.
"""
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/test_kernels_gpu.py runs the compiled kernels, and interpreting "
                "here would make triton interpret for the whole process", allow_module_level=True)

# The interpreter is a process-wide choice: @triton.jit reads TRITON_INTERPRET when a kernel is
# defined, Triton's own library functions included, so it must be set when triton is first imported.
# It is set for that import and then restored, so that test files collected after this one still get
# the torch path from expo_linear on CPU tensors; the fixture below sets it again while these run.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from expo_kernels import triton_decode, triton_prefill
    from triton.runtime.interpreter import InterpretedFunction
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

import triton.language as tl
from expo_kernels import encode_delta, expo_linear, reference_linear
from kernel_cases import (
    TOLERANCE,
    kernel_args,
    make_problem,
    mixed_alpha,
    relative_error,
    runs_alpha,
    spectrum_delta,
)

if not (isinstance(tl.standard.cdiv, InterpretedFunction)
        and isinstance(triton_decode._expo_decode_kernel, InterpretedFunction)):
    pytest.skip("triton was imported for a GPU earlier in this process, so it cannot interpret; "
                "run this file in a process of its own", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def interpreting():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # Triton also reads it lazily, on a kernel's first call
        yield


N, K = 123, 431
DTYPES = list(TOLERANCE)
# name -> encode_delta arguments. int4 group 128 covers a whole 128-wide K tile (scale applied per
# tile); group 48 makes tiles span several groups and groups straddle tiles (scales per element).
ENCODINGS = {
    "dense": dict(encoding="dense"),
    "int8": dict(encoding="int8"),
    "int4-g48": dict(encoding="int4", group_size=48),
    "int4-g128": dict(encoding="int4", group_size=128),
    "bit": dict(encoding="bit"),
    "lowrank": dict(encoding="lowrank", rank=20),
}
KERNELS = {"decode": triton_decode.decode_linear, "prefill": triton_prefill.prefill_linear}


def problem(m: int, dtype, name: str, with_bias: bool = True):
    return make_problem(m, N, K, dtype, with_bias=with_bias, **ENCODINGS[name])


def run_kernel(kernel: str, x, w, d, alpha, bias, delta_bias, **kwargs) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)  # poisoned
    KERNELS[kernel](x, w, *kernel_args(d), alpha, bias, delta_bias, out=out, **kwargs)
    return out


def check(out, x, w, d, alpha, bias, delta_bias):
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written or not finite"
    ref = reference_linear(x, w, d, alpha, bias, delta_bias)
    tol = TOLERANCE[x.dtype]
    # The Δ term must be far above the tolerance, or a kernel that dropped it would pass.
    without_delta = reference_linear(x, w, encode_delta(torch.zeros(N, K), "zero"), alpha, bias)
    assert relative_error(without_delta.to(x.dtype), ref) > 10 * tol
    err = relative_error(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_kernel_matches_float64_reference(kernel, dtype, name, m):
    # Biases on for odd M, off for even: both epilogues, without doubling the (slow) interpreted runs.
    x, w, d, bias, delta_bias = problem(m, dtype, name, with_bias=m % 2 == 1)
    # Prefill's common case is runs of one α: 40 + 24 rows make one 32-row tile of one α (the merged
    # product) and one where the runs meet (the two-product form). Decode mixes α row by row.
    alpha = runs_alpha([40, 24]) if (kernel == "prefill" and m == 64) else mixed_alpha(m)
    check(run_kernel(kernel, x, w, d, alpha, bias, delta_bias), x, w, d, alpha, bias, delta_bias)


@pytest.mark.parametrize("name, dtype", [("dense", torch.bfloat16), ("int8", torch.float32),
                                         ("int4-g48", torch.bfloat16), ("int4-g128", torch.float16),
                                         ("bit", torch.float32)], ids=str)
def test_prefill_tiles_mixing_every_alpha(name, dtype):
    """Six α in every 32-row tile: the two-product form, α applied to x's columns.
    (lowrank has one form only: its α is applied per row in the epilogue, tested above.)"""
    x, w, d, bias, delta_bias = problem(64, dtype, name)
    alpha = mixed_alpha(64)
    check(run_kernel("prefill", x, w, d, alpha, bias, delta_bias), x, w, d, alpha, bias, delta_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["dense", "int8", "int4-g48", "lowrank"])
def test_decode_split_k(dtype, name):
    """K split over 3 programs: 4 tiles of 128 give splits of 2, 2 and 0 tiles (an empty split must
    still write its zero partial); the partials are summed, and the biases added, by the reduce."""
    x, w, d, bias, delta_bias = problem(17, dtype, name)
    alpha = mixed_alpha(17)
    check(run_kernel("decode", x, w, d, alpha, bias, delta_bias, split_k=3), x, w, d, alpha, bias, delta_bias)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, computing with the NaN row
@pytest.mark.parametrize("layout", ["one alpha", "mixed"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_non_finite_alpha_stays_in_its_row(kernel, layout):
    x, w, d, bias, delta_bias = problem(17, torch.float32, "dense")
    alpha = torch.full((17,), 0.3) if layout == "one alpha" else mixed_alpha(17)
    alpha[5], alpha[6] = float("nan"), float("inf")
    out = run_kernel(kernel, x, w, d, alpha, bias, delta_bias)
    assert not torch.isfinite(out[5]).any() and not torch.isfinite(out[6]).all()
    keep = [i for i in range(17) if i not in (5, 6)]
    ref = reference_linear(x, w, d, alpha, bias, delta_bias)[keep]
    assert relative_error(out[keep], ref) < TOLERANCE[torch.float32]


def test_zero_rows_and_scalar_alpha():
    x, w, d, bias, _ = problem(3, torch.float32, "int8")
    for kernel in KERNELS:
        assert run_kernel(kernel, x[:0], w, d, torch.zeros(0), bias, None).shape == (0, N)
    # one α for every row, given as a number
    y = expo_linear(x, w, d, 0.7, bias, backend="decode")
    ref = reference_linear(x, w, d, torch.full((3,), 0.7), bias)
    assert relative_error(y, ref) < TOLERANCE[torch.float32]


def test_expo_linear_dispatch_under_the_interpreter(monkeypatch):
    """On CPU tensors with TRITON_INTERPRET=1, expo_linear runs the Triton kernels: decode up to
    DECODE_MAX_M rows, prefill above. Leading dimensions and α of the same shape are flattened."""
    from expo_kernels import linear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    for name, module, fn in (("decode", triton_decode, "decode_linear"), ("prefill", triton_prefill, "prefill_linear")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for m, expected in ((2, "decode"), (linear.DECODE_MAX_M, "decode"), (linear.DECODE_MAX_M + 1, "prefill")):
        x, w, d, bias, delta_bias = problem(m, torch.float32, "bit")
        alpha = mixed_alpha(m)
        y = expo_linear(x.reshape(1, m, K), w, d, alpha.reshape(1, m), bias, delta_bias)
        assert calls[-1] == expected and y.shape == (1, m, N)
        check(y.reshape(m, N), x, w, d, alpha, bias, delta_bias)


# -- mixed Δ (issue 16): its bands go through expo_linear, which decodes them to low-rank factors ----

MIXED = dict(encoding="mixed", band_ranks=(5, 6, 9))  # every band; 6 and 9 leave bytes part-filled


def check_mixed(y, x, w, d, alpha, bias, delta_bias):
    assert y.shape == (x.shape[0], N) and y.dtype == x.dtype
    check(y, x, w, d, alpha, bias, delta_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 5, 17])
def test_mixed_decode_matches_float64_reference(dtype, m):
    x, w, d, bias, delta_bias = make_problem(m, N, K, dtype, with_bias=m != 5, **MIXED)
    alpha = mixed_alpha(m)
    check_mixed(expo_linear(x, w, d, alpha, bias, delta_bias, backend="decode"), x, w, d, alpha, bias, delta_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["runs", "mixed"])
def test_mixed_prefill_matches_float64_reference(dtype, layout):
    m = 70
    x, w, d, bias, delta_bias = make_problem(m, N, K, dtype, with_bias=layout == "runs", **MIXED)
    alpha = runs_alpha([40, 30]) if layout == "runs" else mixed_alpha(m)
    check_mixed(expo_linear(x, w, d, alpha, bias, delta_bias, backend="prefill"), x, w, d, alpha, bias, delta_bias)


def test_mixed_auto_dispatch_with_an_encoded_budget():
    """expo_linear on CPU tensors with TRITON_INTERPRET=1 picks the kernels by M; here with bands the
    encoder chose for a 1-bit budget."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, K, generator=g) / K**0.5
    d = encode_delta(spectrum_delta(N, K) * 30, "mixed", bits=1.0)
    assert d.rank > 0
    for m in (3, 65):
        x = torch.randn(m, K, generator=g)
        alpha = mixed_alpha(m)
        check_mixed(expo_linear(x, w, d, alpha), x, w, d, alpha, None, None)


def test_autotune_pruning_keeps_configs_that_fit():
    """The GPU autotuner only ever sees configs of x's dtype that fit an H100's shared memory, and
    prefill row tiles no taller than the batch needs (checked here: the GPU path never runs on CPU)."""
    from expo_kernels.triton_common import SMEM_BUDGET, stage_bytes

    for dtype in (torch.bfloat16, torch.float32):
        for name, kwargs in (("int4", dict(DELTA="int4", R_BLOCK=16)), ("lowrank", dict(DELTA="lowrank", R_BLOCK=64))):
            x, w, d, _, _ = problem(1, dtype, "int4-g128" if name == "int4" else "lowrank")
            args = {"x_ptr": x, "w_ptr": w, "d0_ptr": next(iter(d.parts().values())), "m_bucket": 64}
            for block_m in (16, 64):
                kept = triton_decode._prune(triton_decode._expo_decode_tuned.configs, args,
                                            BLOCK_M=block_m, BLOCK_N=64, **kwargs)
                assert kept and all((c in triton_decode._FP32_CONFIGS) == (dtype == torch.float32) for c in kept)
                assert all(c.num_stages * stage_bytes(args, block_m, 64, c.kwargs["BLOCK_K"], kwargs["DELTA"],
                                                      kwargs["R_BLOCK"]) <= SMEM_BUDGET for c in kept)
            kept = triton_prefill._prune(triton_prefill._expo_prefill_tuned.configs, args, **kwargs)
            assert kept and all((c in triton_prefill._FP32_CONFIGS) == (dtype == torch.float32) for c in kept)
            assert all(c.kwargs["BLOCK_M"] <= 64 for c in kept)
    big = {**args, "x_ptr": args["x_ptr"].bfloat16(), "w_ptr": args["w_ptr"].bfloat16(), "m_bucket": 2048}
    assert any(c.kwargs["BLOCK_M"] == 256 for c in triton_prefill._prune(
        triton_prefill._expo_prefill_tuned.configs, big, DELTA="dense", R_BLOCK=16))
