"""The compiled Triton kernels on a CUDA GPU: exactness against float64, capture in a CUDA graph
with α read from a buffer, and no host synchronisation. Skipped on machines without a GPU, where
tests/test_kernels_triton.py interprets the same kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 would interpret the kernels instead of compiling them", allow_module_level=True)

from expo_kernels import expo_linear, reference_linear, triton_decode, triton_prefill  # noqa: E402
from kernel_cases import (  # noqa: E402
    TOLERANCE,
    kernel_args,
    make_problem,
    mixed_alpha,
    relative_error,
    runs_alpha,
)

CUDA = torch.device("cuda")
ENCODINGS = {
    "dense": dict(encoding="dense"),
    "int8": dict(encoding="int8"),
    "int4-g128": dict(encoding="int4", group_size=128),
    "int4-g48": dict(encoding="int4", group_size=48),
    "bit": dict(encoding="bit"),
    "lowrank": dict(encoding="lowrank", rank=64),
}
KERNELS = {"decode": triton_decode.decode_linear, "prefill": triton_prefill.prefill_linear}


@pytest.mark.parametrize("n, k", [(123, 431), (1024, 4096)])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("kernel, m", [("decode", 1), ("decode", 16), ("decode", 64), ("prefill", 65), ("prefill", 700)])
def test_compiled_kernel_matches_float64_reference(kernel, m, name, dtype, n, k):
    x, w, d, bias, delta_bias = make_problem(m, n, k, dtype, device=CUDA, with_bias=m % 2 == 1, **ENCODINGS[name])
    alpha = runs_alpha([m // 3, m // 3, m - 2 * (m // 3)], device=CUDA) if kernel == "prefill" else mixed_alpha(m, CUDA)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=CUDA)
    KERNELS[kernel](x, w, *kernel_args(d), alpha, bias, delta_bias, out=out)
    assert torch.isfinite(out).all()
    err = relative_error(out, reference_linear(x, w, d, alpha, bias, delta_bias).to(CUDA))
    assert err < TOLERANCE[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("split_k", [2, 5])
def test_decode_split_k(split_k):
    x, w, d, bias, delta_bias = make_problem(8, 1024, 4096, torch.bfloat16, device=CUDA, encoding="int4")
    alpha = mixed_alpha(8, CUDA)
    out = triton_decode.decode_linear(x, w, *kernel_args(d), alpha, bias, delta_bias, split_k=split_k)
    err = relative_error(out, reference_linear(x, w, d, alpha, bias, delta_bias).to(CUDA))
    assert err < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("m", [4, 300])  # decode, prefill
@pytest.mark.parametrize("name", ["int4-g128", "lowrank"])
def test_cuda_graph_replays_with_new_alpha(m, name):
    """α lives in a buffer the graph reads: changing it between replays changes the result, and
    nothing in expo_linear synchronises (set_sync_debug_mode would raise)."""
    x, w, d, bias, delta_bias = make_problem(m, 1024, 2048, torch.bfloat16, device=CUDA, **ENCODINGS[name])
    alpha = runs_alpha([m // 2, m - m // 2], device=CUDA)  # the buffer the graph will read
    expo_linear(x, w, d, alpha, bias, delta_bias)  # warm-up: autotunes and compiles outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = expo_linear(x, w, d, alpha, bias, delta_bias)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    halves = (m // 2, m - m // 2)
    for values in ((0.0, 25.0), (-1.0, 0.3)):
        alpha.copy_(torch.cat([torch.full((h,), v) for h, v in zip(halves, values)]))
        graph.replay()
        torch.cuda.synchronize()
        err = relative_error(y, reference_linear(x, w, d, alpha, bias, delta_bias).to(CUDA))
        assert err < TOLERANCE[torch.bfloat16]


def test_auto_dispatch_by_rows(monkeypatch):
    from expo_kernels import linear

    calls = []
    for name, module, fn in (("decode", triton_decode, "decode_linear"), ("prefill", triton_prefill, "prefill_linear")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for m, expected in ((1, "decode"), (linear.DECODE_MAX_M, "decode"), (linear.DECODE_MAX_M + 1, "prefill")):
        x, w, d, bias, delta_bias = make_problem(m, 256, 512, torch.bfloat16, device=CUDA, encoding="bit")
        alpha = mixed_alpha(m, CUDA)
        y = expo_linear(x, w, d, alpha, bias, delta_bias)
        assert calls[-1] == expected
        assert relative_error(y, reference_linear(x, w, d, alpha, bias, delta_bias).to(CUDA)) < TOLERANCE[torch.bfloat16]
