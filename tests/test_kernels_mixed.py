"""The `mixed` Δ encoding (issue 16): low-rank factors whose singular vectors sit in 8-, 4- and
2-bit bands sized by a bits-per-parameter budget, in the spirit of Delta-CoMe.

Covered: the encoding itself (round trip, budget, layout, joins, tensor-parallel shards), the torch
path against the float64 reference on the decoded Δ, and the engine on a `mixed` delta folder
against Hugging Face on the reference merge of that decoded Δ. The Triton decode and prefill
kernels on a mixed Δ are tested with the others, under the interpreter, in test_kernels_triton.py.
"""
import json

import pytest
import torch

from expo_kernels import (
    ZeroDelta,
    concat_rows,
    encode_delta,
    expo_linear,
    from_parts,
    reference_linear,
    shard_delta,
)
from expo_kernels.encode import MIXED_WIDTHS, _pack_codes, _unpack_codes
from kernel_cases import TOLERANCE, make_problem, mixed_alpha, relative_error, runs_alpha, spectrum_delta


N, K = 123, 431  # no block size divides them
BANDS = (5, 6, 9)  # every band present; 6 and 9 are not multiples of the 2 and 4 codes a byte


# -- the encoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("width", MIXED_WIDTHS)
@pytest.mark.parametrize("dim", [0, 1])
def test_codes_pack_along_the_rank_and_come_back(width, dim):
    q = torch.randint(-(1 << (width - 1)), 1 << (width - 1), (7, 11) if dim == 0 else (11, 7))
    packed = _pack_codes((q + (1 << (width - 1))).to(torch.uint8), width, dim)
    assert packed.dtype == torch.uint8 and packed.shape[dim] == -(-7 * width // 8)
    assert torch.equal(_unpack_codes(packed, width, 7, dim).long(), q)


def test_budget_is_met_and_more_bits_lose_less():
    d = spectrum_delta(96, 160)
    errors = []
    for bits in (0.5, 1.0, 2.0, 4.0):
        e = encode_delta(d, "mixed", bits=bits)
        assert e.nbytes * 8 <= bits * d.numel()  # codes and scales counted
        assert e.nbytes * 8 >= 0.85 * bits * d.numel()  # and the budget is used
        bands = e.params()["bands"]
        assert [b["bits"] for b in bands] == [8, 4, 2] and e.params()["bits"] == bits
        assert sum(b["rank"] for b in bands) == e.rank
        errors.append(e.relative_error(d))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1, errors
    # At 1 bit a parameter the bands beat a bf16 low-rank Δ of the same bytes.
    mixed = encode_delta(d, "mixed", bits=1.0)
    rank = mixed.nbytes // (2 * (96 + 160))
    assert encode_delta(d, "lowrank", rank=rank, dtype=torch.bfloat16).relative_error(d) > mixed.relative_error(d)


def test_round_trip_through_parts_rows_and_device_moves():
    d = spectrum_delta(N, K)
    e = encode_delta(d, "mixed", band_ranks=BANDS)
    assert e.encoding == "mixed" and tuple(e.shape) == (N, K)
    assert e.band_ranks == dict(zip(MIXED_WIDTHS, BANDS))
    parts = e.parts()
    assert {t.dtype for n, t in parts.items() if not n.endswith("_scale")} == {torch.uint8}
    assert {t.dtype for n, t in parts.items() if n.endswith("_scale")} == {torch.float32}
    assert parts["a2"].shape == (3, K) and parts["b2"].shape == (N, 3) and parts["a2_scale"].shape == (9,)
    again = from_parts("mixed", e.shape, parts, json.loads(json.dumps(e.params())))
    assert torch.equal(again.dequantize(), e.dequantize())
    moved = e.to("cpu", torch.bfloat16)  # scales and codes keep their dtypes
    assert all(moved.parts()[n].dtype == t.dtype for n, t in parts.items())
    index = torch.tensor([[0, 5], [122, 5]])
    torch.testing.assert_close(e.rows(index), e.dequantize()[index], rtol=1e-6, atol=1e-9)
    a, b = e.factors(torch.float32)
    torch.testing.assert_close(b @ a, e.dequantize(), rtol=1e-6, atol=1e-9)
    assert e.relative_error(d) < 0.2


def test_a_budget_too_small_for_one_vector_is_zero():
    e = encode_delta(spectrum_delta(40, 50), "mixed", bits=0.01)
    assert e.rank == 0 and e.nbytes == 0 and not e.dequantize().any()
    x, w = torch.randn(3, 50), torch.randn(40, 50)
    dbias = torch.randn(40)
    y = expo_linear(x, w, e, mixed_alpha(3), None, dbias)
    assert relative_error(y, reference_linear(x, w, e, mixed_alpha(3), None, dbias)) < 1e-6


def test_fused_rows_join_band_by_band():
    """q/k/v and gate/up: the joined Δ decodes to the members stacked, a zero member's rows exactly 0."""
    q = encode_delta(spectrum_delta(40, 64, 1), "mixed", band_ranks=(2, 3, 5))
    v = encode_delta(spectrum_delta(24, 64, 2), "mixed", band_ranks=(1, 0, 6))
    joined = concat_rows([q, ZeroDelta(shape=(8, 64)), v], torch.float32)
    assert joined.encoding == "mixed" and joined.band_ranks == {8: 3, 4: 3, 2: 11}
    expected = torch.cat([q.dequantize(), torch.zeros(8, 64), v.dequantize()])
    torch.testing.assert_close(joined.dequantize(), expected, rtol=1e-6, atol=1e-9)
    assert not joined.dequantize()[40:48].any()


def _reader(delta):
    parts = delta.parts()
    return lambda part, dim, start, stop: parts[part] if dim is None else parts[part].narrow(dim, start, stop - start).clone()


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bounds", [(0, 34), (34, 68), (5, 37), (64, 68)])
def test_a_tensor_parallel_shard_is_the_slice_of_the_decoded_delta(dim, bounds):
    delta = encode_delta(spectrum_delta(68, 68), "mixed", band_ranks=(3, 2, 5))
    params = json.loads(json.dumps(delta.params()))  # as the manifest gives them
    shard = shard_delta("mixed", delta.shape, params, _reader(delta), dim, *bounds)
    start, stop = bounds
    expected = delta.dequantize().narrow(dim, start, stop - start)
    assert shard.encoding == "mixed" and tuple(shard.shape) == tuple(expected.shape)
    torch.testing.assert_close(shard.dequantize(), expected, rtol=1e-6, atol=1e-9)
    # Whole bytes, no repacking: a row shard slices b's rows, a column shard a's columns.
    side, other = ("b", "a") if dim == 0 else ("a", "b")
    assert shard.parts()[f"{side}2"].shape[dim] == stop - start
    assert torch.equal(shard.parts()[f"{other}4"], delta.parts()[f"{other}4"])


# -- the kernels against the float64 reference ------------------------------------------------------

def problem(m, dtype, with_bias=True, seed=0):
    return make_problem(m, N, K, dtype, encoding="mixed", band_ranks=BANDS, with_bias=with_bias, seed=seed)


def check(y, x, w, d, alpha, bias, delta_bias):
    assert y.shape == (x.shape[0], N) and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    ref = reference_linear(x, w, d, alpha, bias, delta_bias)
    tol = TOLERANCE[x.dtype]
    without_delta = reference_linear(x, w, ZeroDelta(shape=(N, K)), alpha, bias)
    assert relative_error(without_delta.to(x.dtype), ref) > 10 * tol  # the Δ term shows
    err = relative_error(y, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, layout", [(1, "mixed"), (17, "mixed"), (64, "single"), (100, "runs")])
def test_torch_path_matches_float64_reference(dtype, m, layout):
    x, w, d, bias, delta_bias = problem(m, dtype, with_bias=m % 2 == 1)
    alpha = {"mixed": mixed_alpha, "single": lambda m: torch.full((m,), 2.5),
             "runs": lambda m: runs_alpha([m // 2, m - m // 2])}[layout](m)
    check(expo_linear(x, w, d, alpha, bias, delta_bias, backend="torch"), x, w, d, alpha, bias, delta_bias)


# -- the engine -----------------------------------------------------------------------------------

def test_engine_on_a_mixed_delta_folder_serves_its_decoded_merge(pairs, tmp_path, capsys):
    """`expo-serve delta build --format mixed --bits 1.0`, then the engine on that folder: one
    generate call mixing α gives HF's greedy tokens on θ_sft + (1+α)·decoded Δ."""
    from reference import PROMPTS, decoded_merge_model, reference_greedy

    from expo_serve import LLM, SamplingParams
    from expo_serve.cli import main
    from expo_serve.delta.store import MANIFEST

    sft, aligned = pairs("qwen2")
    folder = tmp_path / "d"
    assert main(["delta", "build", "--sft", str(sft), "--aligned", str(aligned), "--out", str(folder),
                 "--format", "mixed", "--dtype", "float32"]) == 0
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["encoding"] == "mixed" and manifest["bits"] == 1.0
    matrices = [t for t in manifest["tensors"].values() if t["encoding"] == "mixed"]
    assert matrices and all(t["params"]["bits"] == 1.0 and len(t["params"]["bands"]) == 3 for t in matrices)
    assert all(t["stored_bytes"] * 8 <= t["shape"][0] * t["shape"][1] for t in matrices)
    assert all(sum(band["rank"] for band in t["params"]["bands"]) > 0 for t in matrices)
    capsys.readouterr()
    assert main(["delta", "inspect", str(folder)]) == 0
    assert "mixed, 1 bits a parameter" in capsys.readouterr().out

    alphas = [-1.0, 0.0, 0.3, 2.5]
    llm = LLM(str(sft), delta=str(folder))
    params = [SamplingParams(alpha=a, max_tokens=8, temperature=0.0, ignore_eos=True) for a in alphas]
    outs = llm.generate(PROMPTS, params)
    for prompt, alpha, out in zip(PROMPTS, alphas, outs):
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        ref_tokens, _ = reference_greedy(decoded_merge_model(sft, folder, alpha), ids, 8)
        assert out.token_ids == ref_tokens, f"alpha={alpha}"
