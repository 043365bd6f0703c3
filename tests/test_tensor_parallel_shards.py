"""Tensor-parallel shards of every Δ encoding: the shard built from slices of the stored parts
decodes to exactly the slice of the decoded Δ, for row blocks (column-parallel layers, vocabulary
shards) and column blocks (row-parallel layers), at aligned and unaligned boundaries."""
from __future__ import annotations

import pytest
import torch

from expo_kernels import encode_delta, shard_delta


def _reader(delta):
    parts = delta.parts()

    def read(part, dim, start, stop):
        tensor = parts[part]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start).clone()

    return read


@pytest.mark.parametrize("encoding", ["dense", "int8", "int4", "bit", "lowrank", "zero"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bounds", [(0, 34), (34, 68), (5, 37), (64, 68)])
def test_a_shard_decodes_to_the_slice_of_the_decoded_delta(encoding, dim, bounds):
    torch.manual_seed(0)
    full = torch.randn(68, 68)
    delta = encode_delta(full, encoding, group_size=8, rank=6)
    shard = shard_delta(delta.encoding, delta.shape, delta.params(), _reader(delta), dim, *bounds)
    start, stop = bounds
    expected = delta.dequantize().narrow(dim, start, stop - start)
    assert shard.encoding == delta.encoding
    assert tuple(shard.shape) == tuple(expected.shape)
    if encoding == "lowrank":  # b·a of a column block: the same sums, blocked differently by the product
        torch.testing.assert_close(shard.dequantize(), expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(shard.dequantize(), expected)


def test_a_bias_shard_is_its_slice():
    bias = encode_delta(torch.randn(12), "int8")
    shard = shard_delta(bias.encoding, bias.shape, bias.params(), _reader(bias), 0, 4, 8)
    assert torch.equal(shard.dequantize(), bias.dequantize()[4:8])


def test_the_base_fingerprint_from_sampled_values_equals_the_one_from_whole_tensors(pairs):
    """A tensor-parallel rank 0 checks the delta's base from sampled values of the memory-mapped
    files, never reading a whole tensor; it must agree with the fingerprint of whole tensors."""
    from expo_serve.delta.sources import open_source
    from expo_serve.delta.store import Fingerprint, fingerprint_source

    source = open_source(pairs("qwen2")[0])
    sampled = Fingerprint()
    for name in source.parameter_names:
        shape = tuple(source.shape(name))
        index = Fingerprint.sample_index(torch.Size(shape).numel())
        assert index is not None or torch.Size(shape).numel() <= 4096
        values = source.sample(name, index) if index is not None else source.get(name).reshape(-1)
        sampled.add_sample(name, shape, values)
    assert sampled.hexdigest() == fingerprint_source(source)


def test_a_folder_reads_slices_of_rows_and_columns(pairs):
    from expo_serve.delta.sources import open_source

    source = open_source(pairs("qwen2")[0])
    whole = source.get("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(source.get_slice("model.layers.0.mlp.down_proj.weight", 1, 5, 37), whole[:, 5:37])
    assert torch.equal(source.get_slice("model.layers.0.mlp.down_proj.weight", 0, 3, 9), whole[3:9])
