"""The torch path of expo_linear (what runs on a CPU) against the float64 reference, its caches,
its argument checks, and the `expo::linear` custom op registration."""
import gc

import pytest
import torch
from expo_kernels import (
    BitDelta,
    DenseDelta,
    encode,
    encode_delta,
    expo_linear,
    linear,
    reference_linear,
)
from expo_kernels.linear import expo_linear_op
from kernel_cases import (
    TOLERANCE,
    kernel_args,
    make_problem,
    mixed_alpha,
    relative_error,
    runs_alpha,
)

N, K = 123, 431
ENCODINGS = {
    "dense": dict(encoding="dense"),
    "int8": dict(encoding="int8"),
    "int4": dict(encoding="int4", group_size=48),
    "bit": dict(encoding="bit"),
    "lowrank": dict(encoding="lowrank", rank=20),
}
# α layouts: row by row (decode), runs long enough to merge (prefill prompts), one α for all
LAYOUTS = {
    "mixed": mixed_alpha,
    "runs": lambda m: runs_alpha([m // 2, m - m // 2]),
    "single": lambda m: torch.full((m,), 2.5),
}


def problem(m, dtype, name, with_bias=True):
    return make_problem(m, N, K, dtype, with_bias=with_bias, **ENCODINGS[name])


def assert_close_to_reference(y, x, w, d, alpha, bias, delta_bias):
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    err = relative_error(y, reference_linear(x, w, d, alpha, bias, delta_bias))
    assert err < TOLERANCE[x.dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("m, layout", [(1, "mixed"), (3, "mixed"), (17, "mixed"), (64, "mixed"),
                                       (100, "runs"), (64, "single")])
def test_torch_path_matches_float64_reference(dtype, name, m, layout):
    x, w, d, bias, delta_bias = problem(m, dtype, name, with_bias=m % 2 == 0)
    alpha = LAYOUTS[layout](m)
    y = expo_linear(x, w, d, alpha, bias, delta_bias)
    assert_close_to_reference(y, x, w, d, alpha, bias, delta_bias)


def test_merged_products_serve_shared_alpha(monkeypatch):
    """Rows whose α has >= MERGE_MIN_ROWS rows take one product on W + (1+α)Δ; the rest take two."""
    calls = []
    for fn in ("_merged_product", "_two_products"):
        real = getattr(linear, fn)
        monkeypatch.setattr(linear, fn, lambda x, *a, _real=real, _fn=fn: calls.append((_fn, x.shape[0])) or _real(x, *a))
    x, w, d, bias, delta_bias = problem(100, torch.float32, "dense")
    big = linear.MERGE_MIN_ROWS
    cases = [
        (torch.full((100,), 0.5), [("_merged_product", 100)]),
        (runs_alpha([big, 100 - big]), [("_merged_product", big), ("_merged_product", 100 - big)]),
        # runs of 35 and 40 rows merge (α = -1 like any other); 10 + 15 rows are too few
        (runs_alpha([35, 40, 10, 15]).roll(5), None),
        (mixed_alpha(100), [("_two_products", 100)]),
    ]
    for alpha, expected in cases:
        calls.clear()
        y = expo_linear(x, w, d, alpha, bias, delta_bias)
        assert_close_to_reference(y, x, w, d, alpha, bias, delta_bias)
        if expected is not None:
            assert sorted(calls) == sorted(expected)
        else:
            assert sorted(calls) == [("_merged_product", 35), ("_merged_product", 40), ("_two_products", 25)]


def test_fp32_merged_rows_equal_the_merged_checkpoint():
    """In float32 a merged segment is the merge formula itself (expo_serve.delta.merge's W + Δ·(1+α)):
    the same bits as F.linear on the merged checkpoint."""
    x, w, d, bias, delta_bias = problem(64, torch.float32, "dense")
    alpha = torch.full((64,), 0.3)
    c = float(1.0 + alpha[0])  # 1 + α as the kernels form it, in float32
    merged = torch.nn.functional.linear(x, w + d.delta * c, bias + delta_bias * c)
    assert torch.equal(expo_linear(x, w, d, alpha, bias, delta_bias), merged)


def test_zero_delta_is_a_plain_linear_plus_delta_bias():
    x, w, _, bias, delta_bias = problem(5, torch.float32, "dense")
    zero = encode_delta(torch.zeros(N, K), "zero")
    alpha = mixed_alpha(5)
    assert torch.equal(expo_linear(x, w, zero, alpha, bias), torch.nn.functional.linear(x, w, bias))
    assert_close_to_reference(expo_linear(x, w, zero, alpha, bias, delta_bias), x, w, zero, alpha, bias, delta_bias)


def test_leading_dims_scalar_alpha_and_encoded_delta_bias():
    x, w, d, bias, delta_bias = problem(6, torch.float32, "int8")
    alpha = mixed_alpha(6).reshape(2, 3)
    y = expo_linear(x.reshape(2, 3, K), w, d, alpha, bias, encode_delta(delta_bias, "int8"))  # 1-D: dense
    assert y.shape == (2, 3, N)
    assert_close_to_reference(y.reshape(6, N), x, w, d, alpha.reshape(6), bias, delta_bias)
    y = expo_linear(x, w, d, 0.7, bias, delta_bias)
    assert_close_to_reference(y, x, w, d, torch.full((6,), 0.7), bias, delta_bias)


def test_dense_cache_follows_the_delta():
    x, w, d, _, _ = problem(2, torch.float32, "int4")
    first = linear.dense_delta(d, torch.float32)
    assert linear.dense_delta(d, torch.float32) is first
    assert torch.equal(first, d.dequantize(torch.float32))
    # an in-place change to a stored part is seen
    d.scale.mul_(2.0)
    again = linear.dense_delta(d, torch.float32)
    assert again is not first and torch.equal(again, d.dequantize(torch.float32))
    assert_close_to_reference(expo_linear(x, w, d, mixed_alpha(2)), x, w, d, mixed_alpha(2), None, None)
    # and the decoded copy goes when the delta does
    key = id(d)
    del d
    gc.collect()
    assert key not in encode._DECODED
    # a dense delta of the compute dtype is used as it is
    dense = encode_delta(torch.randn(4, 4), "dense")
    assert linear.dense_delta(dense, torch.float32) is dense.delta


def test_off_cpu_torch_path_is_shape_only():
    """Off the CPU the torch path must not read α (that would synchronise a GPU): on the meta
    device, where reading a value is impossible, every encoding still runs."""
    for name in ENCODINGS:
        x, w, d, bias, delta_bias = problem(64, torch.float32, name)
        d = d.to("meta")
        meta = [t.to("meta") for t in (x, w, runs_alpha([40, 24]), bias, delta_bias)]
        y = linear.torch_linear(meta[0], meta[1], *kernel_args(d), meta[2], meta[3], meta[4])
        assert y.shape == (64, N) and y.device.type == "meta"


def test_argument_checks():
    x, w, d, bias, _ = problem(3, torch.float32, "dense")
    alpha = mixed_alpha(3)
    with pytest.raises(ValueError, match="backend"):
        expo_linear(x, w, d, alpha, backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        expo_linear(x, w[:, :-1], d, alpha)
    with pytest.raises(ValueError, match="match x"):
        expo_linear(x, w.double(), d, alpha)
    with pytest.raises(ValueError, match="does not match weight"):
        expo_linear(x, w, encode_delta(torch.randn(N - 1, K), "dense"), alpha)
    with pytest.raises(ValueError, match="alpha_rows must have shape"):
        expo_linear(x, w, d, alpha[:2])
    with pytest.raises(ValueError, match="alpha_rows must be on"):
        expo_linear(x, w, d, alpha.to("meta"))
    with pytest.raises(ValueError, match="bias must be"):
        expo_linear(x, w, d, alpha, bias[:-1])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        expo_linear(x.double(), w.double(), d, alpha)


@pytest.mark.parametrize("name", ["dense", "int4", "lowrank"])
def test_custom_op_registration(name):
    """The op's schema, fake (meta) implementation and dispatch agree (torch.library.opcheck)."""
    x, w, d, bias, delta_bias = problem(5, torch.float32, name)
    args = (x, w, *kernel_args(d), mixed_alpha(5), bias, delta_bias, "torch")
    torch.library.opcheck(expo_linear_op, args)
    assert_close_to_reference(expo_linear_op(*args), x, w, d, mixed_alpha(5), bias, delta_bias)


def test_bit_delta_through_the_op_uncached():
    """Called as the op (as under torch.compile), packed codes are decoded on the spot."""
    x, w, d, _, _ = problem(4, torch.float32, "bit")
    assert isinstance(d, BitDelta) and not isinstance(d, DenseDelta)
    y = expo_linear_op(x, w, *kernel_args(d), mixed_alpha(4), None, None, "torch")
    assert_close_to_reference(y, x, w, d, mixed_alpha(4), None, None)


@pytest.mark.parametrize("encoding", ["dense", "int8", "int4", "bit", "lowrank"])
def test_concat_rows_joins_shards_in_their_encoding(encoding):
    """Fused q/k/v: shards join in their own encoding (an unchanged shard as that encoding's zero),
    and the joined Δ decodes to the shards' rows in order."""
    from expo_kernels import ZeroDelta, concat_rows, encode_delta

    g = torch.Generator().manual_seed(3)
    shards = [encode_delta(torch.randn(n, 40, generator=g), encoding, group_size=16, rank=4) for n in (24, 8)]
    members = [shards[0], ZeroDelta(shape=(8, 40)), shards[1]]
    joined = concat_rows(members, torch.float32)
    assert joined.encoding == encoding and joined.shape == (40, 40)
    expected = torch.cat([m.dequantize() for m in members])
    assert torch.allclose(joined.dequantize(), expected, atol=1e-6)


def test_concat_rows_falls_back_to_dense_for_mixed_encodings():
    from expo_kernels import ZeroDelta, concat_rows, encode_delta

    g = torch.Generator().manual_seed(4)
    members = [encode_delta(torch.randn(8, 32, generator=g), "int8"), encode_delta(torch.randn(8, 32, generator=g), "bit"),
               ZeroDelta(shape=(8, 32))]
    joined = concat_rows(members, torch.float32)
    assert joined.encoding == "dense"
    assert torch.equal(joined.dequantize(), torch.cat([m.dequantize() for m in members]))
    assert concat_rows([ZeroDelta(shape=(4, 32)), ZeroDelta(shape=(4, 32))], torch.float32).encoding == "zero"
